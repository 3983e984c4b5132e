//! The fly.toml corpus. Every real-world and seed file must be accepted; `spliced check`'s
//! report for every corpus file is compared with its snapshot under `tests/snapshots/`
//! (`SPLICED_BLESS=1 cargo test -p proxy-user --test corpus` rewrites them after a reviewed
//! change); every file under `tests/fixtures/invalid/` must fail with exactly the messages its
//! `# expect:` lines give.

use std::path::{Path, PathBuf};

use proxy_user::{
    check::{Report, render_text, render_warnings},
    config::Config,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("fixture directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// What `spliced check` shows for a file: the report and warnings, or the errors.
fn check_output(name: &str, text: &str) -> (bool, String) {
    match Config::parse(name, text) {
        Ok(c) => {
            // The JSON form must always serialize.
            serde_json::to_string(&Report::new(&c)).expect("the report serializes");
            (
                true,
                format!(
                    "{}--- stderr\n{}--- exit 0\n",
                    render_text(&c),
                    render_warnings(&c)
                ),
            )
        }
        Err(e) => (false, format!("--- stderr\n{e}\n--- exit 2\n")),
    }
}

#[test]
fn corpus_matches_snapshots() {
    let root = fixtures().join("fly-toml");
    let snapshots = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    let bless = std::env::var_os("SPLICED_BLESS").is_some();
    let files = toml_files(&root);
    assert!(
        files.len() >= 70,
        "corpus went missing: {} files",
        files.len()
    );
    let mut failures = Vec::new();
    let mut accepted = 0;
    for path in &files {
        let name = path
            .strip_prefix(&root)
            .expect("under the corpus")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(path).expect("corpus file");
        let (ok, shown) = check_output(&name, &text);
        accepted += usize::from(ok);
        let must_parse = name.starts_with("real-world/") || name.starts_with("seed-");
        if must_parse && !ok {
            failures.push(format!("{name} must be accepted:\n{shown}"));
        }
        let snap = snapshots.join(format!("{}.check", name.replace('/', "__")));
        let body = format!("# spliced check --config {name}\n{shown}");
        if bless {
            std::fs::create_dir_all(&snapshots).expect("snapshot directory");
            std::fs::write(&snap, &body).expect("write snapshot");
        } else {
            match std::fs::read_to_string(&snap) {
                Ok(want) if want == body => {}
                Ok(want) => failures.push(format!(
                    "{name}: check output changed (SPLICED_BLESS=1 to accept)\n--- want\n{want}--- got\n{body}"
                )),
                Err(_) => failures.push(format!("{name}: no snapshot at {}", snap.display())),
            }
        }
    }
    println!("{accepted} of {} corpus files accepted", files.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_files_fail_with_exact_messages() {
    let files = toml_files(&fixtures().join("invalid"));
    assert!(files.len() >= 30, "invalid corpus went missing");
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("invalid fixture");
        let want: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !want.is_empty(),
            "{} has no `# expect:` line",
            path.display()
        );
        let name = "fly.toml";
        match Config::parse(name, &text) {
            Ok(_) => failures.push(format!("{}: accepted", path.display())),
            Err(e) => {
                let got = e.to_string();
                let got: Vec<&str> = got.lines().collect();
                if got != want {
                    failures.push(format!(
                        "{}:\n  want {want:#?}\n  got  {got:#?}",
                        path.display()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
