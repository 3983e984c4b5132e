//! Unit tests of the config model; the corpus tests live in `proxy-user/tests/`.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse("fly.toml", text)
}

#[test]
fn short_and_long_port_forms() {
    let c = parse(
        "app = \"x\"\n[env]\nA = \"1\"\n\n[[services]]\ninternal_port = \"9000\"\nprotocol = \"tcp\"\nport = 10001\n\n[[services]]\ninternal_port = 9001\n[[services.ports]]\nport = \"10002\"\n[[services.ports]]\nstart_port = 10003\nend_port = 10004\n",
    )
    .expect("valid config");
    let ports: Vec<(u16, u16)> = c
        .public_ports()
        .map(|(s, p)| (p.port, s.internal_port))
        .collect();
    assert_eq!(
        ports,
        vec![(10001, 9000), (10002, 9001), (10003, 9001), (10004, 9001)]
    );
}

#[test]
fn first_portless_service_gets_80_and_443() {
    let c = parse("[[services]]\ninternal_port = 8080\n[[services]]\ninternal_port = 9\n")
        .expect("valid config");
    let ports: Vec<u16> = c.services[0].ports.iter().map(|p| p.port).collect();
    assert_eq!(ports, vec![80, 443]);
    assert!(c.services[1].ports.is_empty(), "second is internal-only");
}

#[test]
fn bad_port_names_line_column_and_field() {
    let err = parse("[[services]]\ninternal_port = 8080\n  [[services.ports]]\n  port = 70000\n")
        .expect_err("70000 is not a port")
        .to_string();
    assert_eq!(
        err,
        "fly.toml:4:10: services[0].ports[0].port: 70000 is not a port (1-65535)"
    );
}

#[test]
fn duplicate_public_port_names_both_blocks() {
    let err = parse("[[services]]\nport = 80\n[[services]]\nport = 80\n")
        .expect_err("duplicate")
        .to_string();
    assert_eq!(
        err,
        "fly.toml:4:8: services[1].port: public port 80/tcp is already claimed by services[0]"
    );
}

#[test]
fn syntax_error_has_position() {
    let err = parse("[[services]\n").expect_err("bad toml").to_string();
    assert!(err.starts_with("fly.toml:1:"), "{err}");
}

#[test]
fn udp_parses_but_is_not_servable() {
    let c = parse("[[services]]\nprotocol = \"udp\"\nport = 53\n").expect("udp parses");
    assert_eq!(c.services[0].protocol, Protocol::Udp);
    assert_eq!(
        c.unservable(),
        vec!["port 53/udp (services[0]): UDP services are not implemented yet".to_owned()]
    );
}

#[test]
fn every_error_is_reported() {
    let err = parse(
        "[[services]]\ninternal_port = 0\n[[services.ports]]\nport = 80\nhandlers = [\"https\"]\n[services.concurrency]\nhard_limit = 5\nsoft_limit = 6\n",
    )
    .expect_err("three errors")
    .to_string();
    assert_eq!(
        err,
        "fly.toml:2:17: services[0].internal_port: 0 is not a port (1-65535)\n\
         fly.toml:5:13: services[0].ports[0].handlers[0]: \"https\" is not a handler (tls, http, proxy_proto, pg_tls, edge_http); did you mean \"http\"?\n\
         fly.toml:8:14: services[0].concurrency.soft_limit: 6 is above hard_limit 5"
    );
}

#[test]
fn same_port_other_protocol_is_fine() {
    let c = parse("[[services]]\nport = 53\n[[services]]\nprotocol = \"udp\"\nport = 53\n")
        .expect("tcp and udp may share a port");
    assert_eq!(c.public_ports().count(), 2);
}

#[test]
fn machines_follow_process_groups() {
    let c = parse(
        "[processes]\nweb = \"run web\"\nworker = \"run worker\"\n\
         [[services]]\nprocesses = [\"web\"]\nport = 10\n\
         [[services]]\nprocesses = [\"worker\"]\nport = 11\n\
         [[machines]]\nid = \"a\"\naddress = \"10.0.0.1\"\nprocesses = [\"web\"]\n\
         [[machines]]\nid = \"b\"\naddress = \"fd00::2\"\n",
    )
    .expect("valid");
    assert_eq!(c.services[0].machines, vec!["a", "b"]);
    assert_eq!(c.services[1].machines, vec!["b"]);
}

#[test]
fn unknown_key_warns_with_suggestion() {
    let c = parse("[[services]]\ninternal_prot = 9\nport = 10\n").expect("a warning only");
    assert_eq!(
        c.warnings[0].to_string(),
        "fly.toml:2:1: services[0].internal_prot: unknown key, ignored; did you mean `internal_port`?"
    );
}

#[test]
fn proxy_proto_is_v1_unless_its_options_say_v2() {
    let c = parse(
        "[[services]]\ninternal_port = 9\n[[services.ports]]\nport = 1\nhandlers = [\"tls\", \"proxy_proto\"]\n[[services.ports]]\nport = 2\nhandlers = [\"proxy_proto\"]\nproxy_proto_options = { version = \"v2\" }\n[[services.ports]]\nport = 3\nhandlers = [\"tls\"]\n",
    )
    .expect("valid config");
    let versions: Vec<Option<ProxyProtoVersion>> =
        c.public_ports().map(|(_, p)| p.proxy_proto).collect();
    assert_eq!(
        versions,
        vec![
            Some(ProxyProtoVersion::V1),
            Some(ProxyProtoVersion::V2),
            None
        ]
    );
    assert!(c.unservable().is_empty(), "{:?}", c.unservable());
}

#[test]
fn edge_http_is_refused_with_what_to_use_instead() {
    let c = parse(
        "[[services]]\ninternal_port = 9\n[[services.ports]]\nport = 1\nhandlers = [\"edge_http\"]\n",
    )
    .expect("valid config");
    assert_eq!(
        c.unservable(),
        vec![
            "port 1 (services[0]): edge_http is a handler of Fly's own edge, not one an app's ports can use; use http"
                .to_owned()
        ]
    );
}

#[test]
fn machines_with_a_command_run_on_the_host_unless_told_otherwise() {
    let c = parse(
        "[[services]]\ninternal_port = 9000\nport = 10001\n\n[[machines]]\nid = \"a\"\ncommand = [\"./app\", \"--fast\"]\ndir = \"/srv/app\"\n\n[[machines]]\nid = \"b\"\naddress = \"10.0.0.2\"\n",
    )
    .expect("valid config");
    assert_eq!(c.machines[0].address, IpAddr::from([127, 0, 0, 1]));
    assert_eq!(
        c.machines[0].command.as_deref(),
        Some(&["./app".to_owned(), "--fast".to_owned()][..])
    );
    assert_eq!(c.machines[0].dir.as_deref(), Some("/srv/app"));
    assert_eq!(c.machines[1].command, None);
}

#[test]
fn bad_machine_commands_name_line_and_field() {
    let err = parse("[[machines]]\nid = \"a\"\ncommand = []\n")
        .expect_err("an empty command")
        .to_string();
    assert!(
        err.contains("fly.toml:3:") && err.contains("machines[0].command"),
        "{err}"
    );
    let err = parse("[[machines]]\nid = \"a\"\ncommand = [\"x\", 1]\n")
        .expect_err("a number in a command")
        .to_string();
    assert!(err.contains("machines[0].command[1]"), "{err}");
    // Without a command, the address stays required.
    let err = parse("[[machines]]\nid = \"a\"\n")
        .expect_err("no address")
        .to_string();
    assert!(err.contains("a machine needs an address"), "{err}");
}

#[test]
fn kill_signal_and_timeout_as_fly_reads_them() {
    let c = parse("kill_signal = \"SIGINT\"\nkill_timeout = 30\n").expect("valid");
    assert_eq!(c.kill_signal.as_deref(), Some("SIGINT"));
    assert_eq!(c.kill_timeout, Some(Duration::from_secs(30)));
    assert!(
        !c.ignored.iter().any(|k| k.starts_with("kill_")),
        "{:?}",
        c.ignored
    );
    let c = parse("kill_timeout = \"1m\"\n").expect("valid");
    assert_eq!(c.kill_timeout, Some(Duration::from_secs(60)));
    let err = parse("app = \"x\"\nkill_signal = \"SIGHUP\"\n")
        .expect_err("not a signal fly takes")
        .to_string();
    assert!(
        err.contains("fly.toml:2:15") && err.contains("kill_signal"),
        "{err}"
    );
    let err = parse("kill_timeout = 0\n").expect_err("zero").to_string();
    assert!(err.contains("kill_timeout"), "{err}");
}
