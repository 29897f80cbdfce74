//! The built binary's behaviour where no root is needed: bad flags, missing binaries, modes
//! that install nothing, `--dry-run`. Each checks the exit status and the message, and that
//! nothing panicked.

use std::process::{Command, Output};

use weft_api::redirect::{CidrSet, InitArgs};
use weft_redirector::iptables;

const BIN: &str = env!("CARGO_BIN_EXE_weft-redirector");

fn redirector(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        // The environment must not point the binaries elsewhere behind the test's back.
        .env_remove("WEFT_IPTABLES_RESTORE")
        .env_remove("WEFT_IPTABLES_SAVE")
        .env_remove("WEFT_IP6TABLES_RESTORE")
        .env_remove("WEFT_IP6TABLES_SAVE")
        .output()
        .expect("run weft-redirector")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
}

#[test]
fn invalid_values_are_rejected_naming_flag_and_value() {
    for (flag, value) in [
        ("--exclude-outbound-cidrs", "10.1.2.3/40"),
        ("--include-outbound-cidrs", "10.0.0.0/8,bogus"),
        ("--outbound-port", "0"),
        ("--inbound-port", "70000"),
        ("--include-inbound-ports", "80,0"),
        ("--exclude-outbound-ports", "65536"),
        ("--mode", "tproxy"),
        ("--exclude-interfaces", "eth0 eth1"),
    ] {
        let out = redirector(&["init", &format!("{flag}={value}")]);
        assert_fails(&out, 2, &[flag, value]);
    }
    let out = redirector(&["init", "--no-such-flag"]);
    assert_fails(&out, 2, &["--no-such-flag"]);
}

#[test]
fn missing_iptables_names_the_binary_and_the_package() {
    let out = redirector(&["init", "--iptables-restore=/nonexistent/iptables-restore"]);
    assert_fails(
        &out,
        1,
        &[
            "/nonexistent/iptables-restore not found",
            "Debian package `iptables`",
            "apt-get install iptables",
        ],
    );
    let out = redirector(&["cleanup", "--iptables-save=/nonexistent/iptables-save"]);
    assert_fails(&out, 1, &["/nonexistent/iptables-save not found"]);
}

#[test]
fn binaries_can_be_set_from_the_environment() {
    let out = Command::new(BIN)
        .args(["init"])
        .env("WEFT_IPTABLES_SAVE", "/nonexistent/from-env/iptables-save")
        .output()
        .expect("run weft-redirector");
    assert_fails(
        &out,
        1,
        &[
            "/nonexistent/from-env/iptables-save not found",
            "WEFT_IPTABLES_SAVE",
        ],
    );
}

#[test]
fn ebpf_mode_fails_clearly_without_the_node_agent() {
    // No agent has taken this process: the probe is not redirected (and, with SO_DONTROUTE,
    // sends nothing), and the step says what is missing once its timeout is over.
    let out = redirector(&["init", "--mode=ebpf", "--ebpf-timeout=1"]);
    assert_fails(
        &out,
        1,
        &[
            "node agent has not taken this pod",
            "weft-redirector node",
            "interceptionMode: REDIRECT",
        ],
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn mode_none_needs_no_binaries() {
    let out = redirector(&[
        "init",
        "--mode=none",
        "--iptables-restore=/nonexistent/iptables-restore",
        "--iptables-save=/nonexistent/iptables-save",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
}

#[test]
fn dry_run_prints_both_families_without_binaries() {
    let flags = [
        "--include-outbound-cidrs=10.0.0.0/8,fd00::/8",
        "--exclude-outbound-ports=22",
    ];
    let mut argv = vec![
        "init",
        "--dry-run",
        "--iptables-restore=/nonexistent/iptables-restore",
        "--iptables-save=/nonexistent/iptables-save",
    ];
    argv.extend(flags);
    let out = redirector(&argv);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let args = InitArgs {
        include_outbound_cidrs: CidrSet::parse("10.0.0.0/8,fd00::/8").expect("cidrs"),
        exclude_outbound_ports: vec![22],
        ..InitArgs::default()
    };
    assert_eq!(stdout, iptables::dry_run(&args));
    assert!(stdout.contains("# ipv4: iptables-restore --noflush\n*nat\n"));
    assert!(stdout.contains("-A WEFT_OUTPUT -d 10.0.0.0/8 -j WEFT_REDIRECT\n"));
    assert!(stdout.contains("# ipv6: ip6tables-restore --noflush\n*nat\n"));
    assert!(stdout.contains("-A WEFT_OUTPUT -d fd00::/8 -j WEFT_REDIRECT\n"));
}
