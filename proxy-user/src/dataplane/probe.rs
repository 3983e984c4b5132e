//! What this kernel offers the sockmap plane, found by asking it, never from its version: each
//! map type, program type and helper the BPF object uses (read from the object itself, so the
//! list cannot drift from the programs), cgroup v2, and, when asked, a trial load and attach of
//! every program; and kernel TLS, which the `tls` handler uses where it finds it. `spliced check
//! --kernel` prints it; `spliced run` consults it before loading.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{
        BpfHelper, is_btf_supported, is_helper_supported, is_map_supported, is_program_supported,
    },
};
use aya_obj::{Object, ProgramSection, generated::bpf_insn};

use super::{cgroup, kernel};

/// One feature of the kernel, and whether this host has it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    /// The kernel feature, as the kernel names it.
    pub feature: String,
    /// What in spliced uses it.
    pub used_by: String,
    /// Whether the kernel has it.
    pub found: bool,
    /// Why not, or what was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Whether the sockmap plane can run without it.
    pub required: bool,
}

/// What this host's kernel supports of what the sockmap plane uses.
#[derive(Debug, serde::Serialize)]
pub struct Support {
    /// The kernel's release (`uname -r`), for the reader only.
    pub kernel: String,
    pub checks: Vec<Check>,
}

/// The map types the object may use, with the kernel's names.
const MAP_TYPES: &[(u32, MapType, &str)] = &[
    (1, MapType::Hash, "BPF_MAP_TYPE_HASH"),
    (2, MapType::Array, "BPF_MAP_TYPE_ARRAY"),
    (4, MapType::PerfEventArray, "BPF_MAP_TYPE_PERF_EVENT_ARRAY"),
    (6, MapType::PerCpuArray, "BPF_MAP_TYPE_PERCPU_ARRAY"),
    (15, MapType::SockMap, "BPF_MAP_TYPE_SOCKMAP"),
    (18, MapType::SockHash, "BPF_MAP_TYPE_SOCKHASH"),
    (27, MapType::RingBuf, "BPF_MAP_TYPE_RINGBUF"),
];

/// The helpers the programs may call.
const HELPERS: &[BpfHelper] = &[
    BpfHelper::BPF_FUNC_map_lookup_elem,
    BpfHelper::BPF_FUNC_map_update_elem,
    BpfHelper::BPF_FUNC_map_delete_elem,
    BpfHelper::BPF_FUNC_ktime_get_ns,
    BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
    BpfHelper::BPF_FUNC_get_smp_processor_id,
    BpfHelper::BPF_FUNC_get_socket_cookie,
    BpfHelper::BPF_FUNC_skb_adjust_room,
    BpfHelper::BPF_FUNC_sk_redirect_hash,
    BpfHelper::BPF_FUNC_msg_redirect_hash,
    BpfHelper::BPF_FUNC_sock_hash_update,
    BpfHelper::BPF_FUNC_sock_ops_cb_flags_set,
    BpfHelper::BPF_FUNC_perf_event_output,
    BpfHelper::BPF_FUNC_ringbuf_output,
    BpfHelper::BPF_FUNC_ringbuf_reserve,
    BpfHelper::BPF_FUNC_ringbuf_submit,
    BpfHelper::BPF_FUNC_ringbuf_discard,
    BpfHelper::BPF_FUNC_probe_read_kernel,
    BpfHelper::BPF_FUNC_probe_read_kernel_str,
];

/// An instruction that calls a helper (`BPF_JMP | BPF_CALL`, source 0; source 1 is a call of
/// a function of the object).
fn called_helper(insn: bpf_insn) -> Option<u32> {
    (insn.code == 0x85 && insn.src_reg() == 0).then_some(insn.imm as u32)
}

/// The kernel's name of helper `h` (`bpf_map_lookup_elem`).
fn helper_name(h: BpfHelper) -> String {
    format!("{h:?}").replace("BPF_FUNC_", "bpf_")
}

/// The program type, its kernel name and its role, of a section of the object.
fn program_type(section: &ProgramSection) -> Option<(ProgramType, &'static str, &'static str)> {
    match section {
        ProgramSection::SkSkbStream { .. } => Some((
            ProgramType::SkSkb,
            "BPF_PROG_TYPE_SK_SKB",
            "the stream verdict: moves every received byte to the peer",
        )),
        ProgramSection::SkMsg => Some((
            ProgramType::SkMsg,
            "BPF_PROG_TYPE_SK_MSG",
            "the egress audit (--egress-audit)",
        )),
        ProgramSection::SockOps => Some((
            ProgramType::SockOps,
            "BPF_PROG_TYPE_SOCK_OPS",
            "holds and their release (header-option and RTT callbacks)",
        )),
        _ => None,
    }
}

impl Support {
    /// Probes every feature the object uses; each probe is a system call or two. With
    /// `attach`, also loads every program and attaches it as `spliced run` does, then detaches.
    pub fn probe(attach: bool) -> Self {
        let mut checks = Vec::new();
        match Object::parse(kernel::OBJECT) {
            Ok(object) => {
                privilege(&mut checks);
                if checks.iter().all(|c| c.found) {
                    maps(&object, &mut checks);
                    programs(&object, &mut checks);
                }
            }
            Err(e) => checks.push(Check {
                feature: "the BPF object".to_owned(),
                used_by: "the sockmap plane".to_owned(),
                found: false,
                detail: Some(if kernel::OBJECT.is_empty() {
                    "this build carries none (built with AYA_BUILD_SKIP=1)".to_owned()
                } else {
                    e.to_string()
                }),
                required: true,
            }),
        }
        checks.push(cgroup_v2());
        checks.push(Check {
            feature: "kernel BTF".to_owned(),
            used_by: "nothing: the programs read no kernel structure through BTF, and the \
                      verifier checks their context fields"
                .to_owned(),
            found: is_btf_supported().unwrap_or(false),
            detail: None,
            required: false,
        });
        let tls = crate::tls::kernel::unavailable();
        checks.push(Check {
            feature: "kernel TLS (TCP_ULP tls)".to_owned(),
            used_by: "tls and pg_tls ports that forward plaintext: the kernel encrypts and \
                      decrypts after the handshake (without it, rustls does, in userspace)"
                .to_owned(),
            found: tls.is_none(),
            detail: tls.map(str::to_owned),
            required: false,
        });
        let with_maps = crate::tls::kernel::with_socket_maps();
        checks.push(Check {
            feature: "kernel TLS on a socket in a socket map".to_owned(),
            used_by: "nothing: where the kernel allows it, a kernel TLS session's machine bytes \
                      could be redirected into its client's socket; the daemon moves them"
                .to_owned(),
            found: with_maps.is_ok(),
            detail: with_maps.err(),
            required: false,
        });
        if attach && checks.iter().all(|c| c.found || !c.required) {
            let trial = kernel::trial_attach();
            checks.push(Check {
                feature: "load and attach".to_owned(),
                used_by: "the sockmap plane: every program verified and attached (verdict to a \
                          SOCKHASH, sk_msg to a SOCKHASH, sock_ops to the daemon's cgroup)"
                    .to_owned(),
                found: trial.is_ok(),
                detail: trial.err().map(|e| e.to_string()),
                required: true,
            });
        }
        Self {
            kernel: release(),
            checks,
        }
    }

    /// `Ok` when the kernel has every feature the sockmap plane requires; else one message
    /// naming each one missing and what uses it.
    pub fn sockmap_ready(&self) -> Result<(), String> {
        let missing: Vec<String> = self
            .checks
            .iter()
            .filter(|c| c.required && !c.found)
            .map(|c| match &c.detail {
                Some(d) => format!("{} ({}; used by {})", c.feature, d, c.used_by),
                None => format!("{} (used by {})", c.feature, c.used_by),
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "this host (kernel {}) lacks what the sockmap plane needs: {}",
                self.kernel,
                missing.join("; ")
            ))
        }
    }

    /// A table for people: feature, found, what uses it; then the verdict.
    pub fn render_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!("kernel {}\n", self.kernel);
        let width = self
            .checks
            .iter()
            .map(|c| c.feature.len())
            .max()
            .unwrap_or(0);
        for c in &self.checks {
            let found = match (c.found, c.required) {
                (true, _) => "yes",
                (false, true) => "NO",
                (false, false) => "no",
            };
            let _ = write!(out, "{:width$}  {found:3}  {}", c.feature, c.used_by);
            if let Some(d) = &c.detail {
                let _ = write!(out, " [{d}]");
            }
            out.push('\n');
        }
        match self.sockmap_ready() {
            Ok(()) => out.push_str("sockmap data plane: available\n"),
            Err(e) => {
                let _ = writeln!(
                    out,
                    "sockmap data plane: UNAVAILABLE, the copy plane only: {e}"
                );
            }
        }
        out
    }
}

/// Whether this process may use `bpf()` at all: a hash map is the oldest map there is.
fn privilege(checks: &mut Vec<Check>) {
    let (found, detail) = match is_map_supported(MapType::Hash) {
        Ok(true) => (true, None),
        Ok(false) => (false, Some("the kernel has no BPF hash maps".to_owned())),
        Err(e) => (
            false,
            Some(format!(
                "{e}: {}: spliced needs CAP_BPF and CAP_NET_ADMIN (or root), and a kernel with \
                 CONFIG_BPF_SYSCALL",
                e.io_error
            )),
        ),
    };
    checks.push(Check {
        feature: "bpf() system call".to_owned(),
        used_by: "every map and program".to_owned(),
        found,
        detail,
        required: true,
    });
}

fn maps(object: &Object, checks: &mut Vec<Check>) {
    let mut by_type: Vec<(u32, Vec<&str>)> = Vec::new();
    for (name, map) in &object.maps {
        let t = map.map_type();
        match by_type.iter_mut().find(|(k, _)| *k == t) {
            Some((_, names)) => names.push(name),
            None => by_type.push((t, vec![name])),
        }
    }
    by_type.sort_unstable();
    for (t, mut names) in by_type {
        names.sort_unstable();
        let used_by = format!("maps {}", names.join(", "));
        checks.push(match MAP_TYPES.iter().find(|(id, ..)| *id == t) {
            Some(&(_, map_type, feature)) => {
                let (found, detail) =
                    answer(is_map_supported(map_type).map_err(|e| format!("{e}: {}", e.io_error)));
                Check {
                    feature: feature.to_owned(),
                    used_by,
                    found,
                    detail,
                    required: true,
                }
            }
            None => unknown(format!("map type {t}"), used_by),
        });
    }
}

fn programs(object: &Object, checks: &mut Vec<Check>) {
    let mut names: Vec<&String> = object.programs.keys().collect();
    names.sort_unstable();
    for name in names {
        let program = &object.programs[name];
        let Some((prog_type, feature, role)) = program_type(&program.section) else {
            checks.push(unknown(
                format!("program section {:?}", program.section),
                name.clone(),
            ));
            continue;
        };
        let (found, detail) = answer(is_program_supported(prog_type).map_err(|e| e.to_string()));
        checks.push(Check {
            feature: feature.to_owned(),
            used_by: format!("{name}: {role}"),
            found,
            detail,
            required: true,
        });
        if !found {
            continue;
        }
        for id in helpers_called(object, program) {
            checks.push(match HELPERS.iter().find(|h| **h as u32 == id) {
                Some(&helper) => {
                    let (found, detail) =
                        answer(is_helper_supported(prog_type, helper).map_err(|e| e.to_string()));
                    Check {
                        feature: format!("{} in {feature}", helper_name(helper)),
                        used_by: name.clone(),
                        found,
                        detail,
                        required: true,
                    }
                }
                None => unknown(format!("helper #{id} in {feature}"), name.clone()),
            });
        }
    }
}

/// The helpers `program` calls, each once, in ascending order. The object's other functions
/// (the compiler's memcpy and the like, in `.text`) call none: a unit test holds that.
fn helpers_called(object: &Object, program: &aya_obj::Program) -> Vec<u32> {
    let mut ids: Vec<u32> = object
        .functions
        .get(&program.function_key())
        .into_iter()
        .flat_map(|f| f.instructions.iter().copied().filter_map(called_helper))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A probe's answer as `found` and why not.
fn answer(r: Result<bool, String>) -> (bool, Option<String>) {
    match r {
        Ok(true) => (true, None),
        Ok(false) => (false, Some("not in this kernel".to_owned())),
        Err(e) => (false, Some(format!("probe failed: {e}"))),
    }
}

/// A feature of the object this module has no probe for: the trial load decides.
fn unknown(feature: String, used_by: String) -> Check {
    Check {
        feature,
        used_by,
        found: false,
        detail: Some("spliced has no probe for it; the load will tell".to_owned()),
        required: false,
    }
}

fn cgroup_v2() -> Check {
    let found = cgroup::own_cgroup_path().and_then(|path| {
        cgroup::open_cgroup("spliced_hold", &path)
            .map(|_| path)
            .map_err(|e| e.to_string())
    });
    Check {
        feature: "cgroup v2".to_owned(),
        used_by: "spliced_hold attaches to the daemon's cgroup".to_owned(),
        found: found.is_ok(),
        detail: Some(found.unwrap_or_else(|e| e)),
        required: true,
    }
}

/// The kernel's release, as `uname -r` prints it.
fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "(unknown)".to_owned(), |s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every map type, program type and helper of the object is one this module probes, and
    /// the object's shared functions call no helper (so each program's list is whole).
    #[test]
    fn the_object_is_wholly_probed() {
        assert!(
            !kernel::OBJECT.is_empty(),
            "built with AYA_BUILD_SKIP=1: no object to read"
        );
        let object = Object::parse(kernel::OBJECT).expect("the object parses");
        for map in object.maps.values() {
            assert!(
                MAP_TYPES.iter().any(|(id, ..)| *id == map.map_type()),
                "map type {} has no probe",
                map.map_type()
            );
        }
        let mut helpers = 0;
        for program in object.programs.values() {
            assert!(
                program_type(&program.section).is_some(),
                "{:?}",
                program.section
            );
            for id in helpers_called(&object, program) {
                assert!(
                    HELPERS.iter().any(|h| *h as u32 == id),
                    "helper #{id} has no probe"
                );
                helpers += 1;
            }
        }
        assert!(helpers >= 5, "only {helpers} helper calls found");
        let program_keys: Vec<_> = object
            .programs
            .values()
            .map(aya_obj::Program::function_key)
            .collect();
        for (key, f) in &object.functions {
            if !program_keys.contains(key) {
                assert_eq!(
                    f.instructions
                        .iter()
                        .copied()
                        .filter_map(called_helper)
                        .count(),
                    0,
                    "{} calls a helper",
                    f.name
                );
            }
        }
    }
}
