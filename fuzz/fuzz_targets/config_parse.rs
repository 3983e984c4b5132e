//! The fly.toml reader on arbitrary text: it must return a config or positioned errors, and
//! whatever it accepts must render as `spliced check` text and JSON; never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_user::{check, config::Config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse("fly.toml", text) {
        Ok(config) => {
            let _ = check::render_text(&config);
            let _ = check::render_warnings(&config);
            let _ = config.unservable();
            serde_json::to_string(&check::Report::new(&config)).expect("the report serializes");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.starts_with("fly.toml:"),
                "unpositioned error: {message}"
            );
        }
    }
});
