//! Golden tests of the rendered rules: for each case, the flags go through the real command line
//! parser and the `--dry-run` text (both families) is compared with `tests/golden/<case>.rules`.
//! Regenerate with `WEFT_BLESS=1 cargo test -p weft-redirector --test golden`, never by hand.

use std::path::PathBuf;

use clap::Parser as _;
use weft_redirector::cli::{Cli, Command};
use weft_redirector::iptables;

const CASES: &[(&str, &[&str])] = &[
    ("default", &[]),
    (
        "inbound-ports-include",
        &["--include-inbound-ports=80,8080,15021"],
    ),
    ("inbound-none", &["--include-inbound-ports="]),
    (
        "inbound-wildcard-exclude",
        &[
            "--include-inbound-ports=*",
            "--exclude-inbound-ports=22,15020,15021,15090",
        ],
    ),
    (
        "outbound-cidrs",
        &[
            "--include-outbound-cidrs=10.96.0.0/12,fd00:10::/64",
            "--exclude-outbound-cidrs=10.96.0.1,fd00:10::1,169.254.169.254/32",
        ],
    ),
    (
        "outbound-ports",
        &[
            "--include-outbound-cidrs=",
            "--include-outbound-ports=3306,5432",
            "--exclude-outbound-ports=22,9090",
        ],
    ),
    ("exclude-interfaces", &["--exclude-interfaces=eth1,net1"]),
    (
        "proxy-ids-and-ports",
        &[
            "--proxy-uid=2000",
            "--proxy-gid=3000",
            "--outbound-port=16001",
            "--inbound-port=16006",
        ],
    ),
    (
        "loopback-include",
        &["--include-outbound-cidrs=127.0.0.0/8,10.0.0.0/8"],
    ),
    (
        "everything",
        &[
            "--mode=REDIRECT",
            "--proxy-uid=1337",
            "--proxy-gid=1338",
            "--include-outbound-cidrs=10.0.0.0/8, 172.16.0.0/12,fd00::/8",
            "--exclude-outbound-cidrs=10.0.0.1/32,fd00::1/128",
            "--include-inbound-ports=80,443,8080",
            "--exclude-inbound-ports=15020,15021,15090,443",
            "--include-outbound-ports=3306",
            "--exclude-outbound-ports=22,25",
            "--exclude-interfaces=eth1",
        ],
    ),
];

fn render(flags: &[&str]) -> String {
    let argv = ["weft-redirector", "init", "--dry-run"]
        .iter()
        .chain(flags.iter());
    let Command::Init(init) = Cli::try_parse_from(argv).expect("flags parse").command else {
        panic!("not init");
    };
    let mut text = String::from("# weft-redirector init");
    for flag in flags {
        text.push(' ');
        text.push_str(flag);
    }
    text.push('\n');
    text.push_str(&iptables::dry_run(&init.redirect.to_init_args()));
    text
}

#[test]
fn rendered_rules_match_golden_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("WEFT_BLESS").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for (name, flags) in CASES {
        let path = dir.join(format!("{name}.rules"));
        let actual = render(flags);
        if bless {
            std::fs::write(&path, &actual).expect("write golden file");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(expected) if expected == actual => {}
            Ok(expected) => failures.push(format!(
                "{} differs (- golden, + actual):\n{}",
                path.display(),
                diff(&expected, &actual)
            )),
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n\nIf the change is intended, run WEFT_BLESS=1 cargo test -p weft-redirector --test golden",
        failures.join("\n\n")
    );
}

#[test]
fn no_stray_golden_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for entry in std::fs::read_dir(&dir).expect("golden dir") {
        let name = entry.expect("entry").file_name();
        let name = name.to_string_lossy();
        let case = name.strip_suffix(".rules").unwrap_or(&name);
        assert!(
            CASES.iter().any(|(n, _)| *n == case),
            "{name} has no case in tests/golden.rs"
        );
    }
}

/// A line diff (longest common subsequence; golden files are small).
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out += &format!("  {}\n", a[i]);
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out += &format!("+ {}\n", b[j]);
            j += 1;
        } else {
            out += &format!("- {}\n", a[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn diff_marks_changed_lines() {
    assert_eq!(
        diff("a\nb\nc\n", "a\nx\nc\nd\n"),
        "  a\n+ x\n- b\n  c\n+ d\n"
    );
}
