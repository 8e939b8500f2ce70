//! README.md's shell blocks, run as written, in order, in one bash session
//! against the real Postgres and RabbitMQ: a command the README shows that
//! does not work fails this test, so the README cannot drift again.
//!
//! The few rewrites ([`rewrite`]) only let the blocks run beside the rest
//! of the suite: free ports for 50051-50053, a fresh database for
//! `portfleet`, the binaries `scripts/test.sh` built for `./target/release/`
//! (whose `cargo build --release` lines are not rerun), no `sudo` as root,
//! and the agent's state in a temporary directory. A block preceded by
//! `<!-- readme-test: skip REASON -->` is not run; `grpcurl` blocks run
//! when grpcurl is installed (Debian does not package it) and otherwise
//! have their methods checked against the protos.
//!
//! Every scan in README.md targets loopback, so running it probes nothing
//! else.

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portfleet_tests::{binary, is_root};

const SKIP_MARK: &str = "<!-- readme-test: skip";

/// One ```sh block of the README: its first line number and its text.
struct Block {
    line: usize,
    text: String,
    skip: Option<String>,
}

fn sh_blocks(readme: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = readme.lines().enumerate();
    let mut last_marker: Option<String> = None;
    while let Some((n, line)) = lines.next() {
        if let Some(reason) = line.trim().strip_prefix(SKIP_MARK) {
            last_marker = Some(reason.trim_end_matches("-->").trim().to_string());
            continue;
        }
        if line.trim() == "```sh" {
            let text: Vec<&str> = lines.by_ref().map(|(_, l)| l).take_while(|l| l.trim() != "```").collect();
            blocks.push(Block { line: n + 1, text: text.join("\n"), skip: last_marker.take() });
        } else if !line.trim().is_empty() {
            last_marker = None;
        }
    }
    blocks
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The README's text with what must differ beside other tests.
fn rewrite(block: &str, bin: &Path, db: &str, ports: &BTreeMap<u16, u16>, root: bool) -> String {
    let mut text = block.replace("./target/release/", &format!("{}/", bin.display()));
    text =
        text.replace("5432/portfleet", &format!("5432/{db}")).replace("postgres portfleet", &format!("postgres {db}"));
    for (from, to) in ports {
        text = text.replace(&from.to_string(), &to.to_string());
    }
    if root {
        text = text.replace("sudo ", "");
    }
    // Joined continuation lines, so `cargo build` lines are found whole.
    text.replace("\\\n", " ")
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("cargo build") {
                format!(": built by scripts/test.sh: {l}")
            } else {
                l.into()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn proto_methods(root: &Path) -> String {
    let dir = root.join("proto/portfleet/v1");
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn has_command(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn every_readme_command_works_as_written() {
    let root_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let is_root = is_root();
    if !is_root {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true: the README test needs root (the agent SYN-scans)"
        );
        eprintln!("skipped: README's agent commands need root (sudo) to SYN-scan");
        return;
    }
    let readme = std::fs::read_to_string(root_dir.join("README.md")).unwrap();
    let blocks = sh_blocks(&readme);
    assert!(blocks.len() >= 6, "README.md has {} sh blocks", blocks.len());

    // README's `createdb` makes it; dropped at the end.
    let db = format!("portfleet_readme_{}", uuid::Uuid::new_v4().simple());
    let bin = binary("portfleet-controller").parent().unwrap().to_path_buf();
    let sandbox = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root_dir.join("scripts"), sandbox.path().join("scripts")).unwrap();
    let ports: BTreeMap<u16, u16> = (50051..=50053).map(|p| (p, free_port())).collect();
    let grpcurl = has_command("grpcurl");
    let protos = proto_methods(&root_dir);

    let mut script =
        String::from("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT\n");
    let mut ran = 0;
    for b in &blocks {
        if let Some(reason) = &b.skip {
            eprintln!("README.md:{}: not run: {reason}", b.line);
            continue;
        }
        if b.text.contains("grpcurl") && !grpcurl {
            for call in b.text.split_whitespace().filter_map(|w| w.strip_prefix("portfleet.v1.ScanService/")) {
                assert!(protos.contains(&format!("rpc {call}(")), "README.md:{}: no rpc {call} in proto/", b.line);
            }
            eprintln!("README.md:{}: grpcurl is not installed: methods checked against the protos only", b.line);
            continue;
        }
        script.push_str(&format!("echo '### README.md:{}' >&2\n", b.line));
        script.push_str(&rewrite(&b.text, &bin, &db, &ports, is_root));
        script.push('\n');
        ran += 1;
    }
    // The RabbitMQ request's scan, by its message id: created and done.
    script.push_str(&format!(
        "for _ in $(seq 120); do s=$(psql -h 127.0.0.1 -U postgres -d {db} -tAc \
         \"SELECT state FROM scans WHERE request_id = 'job-42'\"); \
         [ \"$s\" = completed ] && break; sleep 0.5; done; echo \"amqp scan: $s\"\n",
    ));

    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(sandbox.path())
        .env("PORTFLEET_AGENT_STATE_DIR", sandbox.path().join("state"))
        .env("PORTFLEET_BIN_DIR", &bin)
        .env("PORTFLEET_QUICKSTART_PORT", ports[&50051].to_string())
        .env("PORTFLEET_LISTEN", format!("127.0.0.1:{}", ports[&50051]))
        .env("NO_COLOR", "1")
        .env_remove("DATABASE_URL")
        .env_remove("PORTFLEET_TOKEN")
        .env("PORTFLEET_CONTROLLER", format!("http://127.0.0.1:{}", ports[&50051]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let logs: String =
        ["controller.log", "agent.log", "tls-controller.log", "amqp-controller.log", ".quickstart/agent.log"]
            .iter()
            .map(|f| format!("--- {f}\n{}\n", std::fs::read_to_string(sandbox.path().join(f)).unwrap_or_default()))
            .collect();
    let _ = Command::new("dropdb").args(["-h", "127.0.0.1", "-U", "postgres", "--force", "--if-exists", &db]).status();
    let report = format!("exit {status}\n--- stdout\n{out}\n--- stderr\n{err}\n{logs}");
    assert!(status.success(), "{report}");
    assert!(ran >= 5, "only {ran} blocks ran");
    // Postgres listens on loopback: every scan of 127.0.0.1 finds it.
    assert!(out.matches("127.0.0.1:5432").count() >= 3, "{report}");
    assert!(out.contains("amqp scan: completed"), "{report}");
    assert!(!out.contains('\u{1b}') && !err.contains('\u{1b}'), "colour codes in non-terminal output: {report}");
}

#[test]
fn the_block_parser_sees_skips_and_continuations() {
    let text = "x\n<!-- readme-test: skip needs a DNS name -->\n```sh\na \\\n b\n```\n\n```sh\nc\n```\n```\nd\n```\n";
    let blocks = sh_blocks(text);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].skip.as_deref(), Some("needs a DNS name"));
    assert_eq!((blocks[1].text.as_str(), blocks[1].skip.is_none()), ("c", true));
    let ports = BTreeMap::from([(50051, 1234)]);
    let r = rewrite(
        "cargo build --release \\\n  -p x\nsudo ./target/release/a --c http://h:50051/ -d postgres://postgres@h:5432/portfleet",
        Path::new("/b"),
        "db1",
        &ports,
        true,
    );
    assert_eq!(
        r,
        ": built by scripts/test.sh: cargo build --release    -p x\n/b/a --c http://h:1234/ -d postgres://postgres@h:5432/db1"
    );
}
