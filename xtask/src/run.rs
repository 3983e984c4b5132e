//! `cargo xtask run`: the daemon on `examples/fly.toml`, with a demo backend.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{note, setup, status};

/// Where the demo backend of `cargo xtask run` listens: `examples/fly.toml`'s `internal_port`.
const DEMO_BACKEND: &str = "127.0.0.1:18080";

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    setup::setup()?;
    let bin = setup::build_daemon(root)?;
    let listener = TcpListener::bind(DEMO_BACKEND)
        .with_context(|| format!("the demo backend cannot listen on {DEMO_BACKEND}"))?;
    std::thread::spawn(move || demo_backend(&listener));
    note(&format!(
        "demo backend (echo, upper-cased) listening on {DEMO_BACKEND}"
    ));
    note("spliced listens on port 10080; try:  echo hello | nc -N 127.0.0.1 10080");
    note("stop with Ctrl-C");
    let st = status(
        Command::new(bin)
            .args(["run", "--config"])
            .arg(root.join("examples/fly.toml"))
            .args(args),
    )?;
    if !st.success() {
        bail!("spliced exited with {st}");
    }
    Ok(())
}

/// Echoes each connection's bytes back, ASCII upper-cased, so a reply visibly came through the
/// backend.
fn demo_backend(listener: &TcpListener) {
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut conn: TcpStream = conn;
            let mut buf = [0u8; 16 * 1024];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        buf[..n].make_ascii_uppercase();
                        if conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}
