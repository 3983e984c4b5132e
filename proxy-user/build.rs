//! Builds the kernel programs (`proxy-ebpf`) for the BPF target with the pinned nightly, so a
//! plain `cargo build` builds everything. `AYA_BUILD_SKIP=1` skips it for host-only checks;
//! the daemon then carries an empty object and can only use the copy data plane.

/// The nightly that builds the eBPF crate (`cargo xtask` installs the same, from the same
/// file). Its LLVM (22) must match bpf-linker's; do not float it.
const EBPF_TOOLCHAIN: &str = include_str!("../proxy-ebpf/toolchain").trim_ascii();

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )?;
    let object = std::path::Path::new(&std::env::var("OUT_DIR")?).join("spliced-ebpf");
    if !object.exists() {
        std::fs::write(&object, [])?;
    }
    Ok(())
}
