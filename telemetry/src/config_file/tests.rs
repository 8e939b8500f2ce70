use std::{io::Write as _, net::SocketAddr, path::PathBuf};

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand, builder::BoolishValueParser};

use super::*;

/// A small stand-in for a binary: `serve` is the schema; `tokens` shares
/// the database flags; `other` has no config file.
#[derive(Parser, Debug)]
#[command(name = "demo", version)]
struct Cli {
    /// Log format.
    #[arg(long, env = "DEMO_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"], global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Serve(ServeArgs),
    Tokens {
        #[command(flatten)]
        db: DbArgs,
        #[command(subcommand)]
        action: TokenAction,
    },
    Other {
        #[arg(long)]
        dir: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum TokenAction {
    List,
    Revoke { id: u32 },
}

#[derive(Args, Debug)]
struct DbArgs {
    /// A TOML file of settings.
    #[arg(long = "config", env = "DEMO_CONFIG", value_name = "FILE", global = true)]
    config_file: Option<PathBuf>,
    /// Database URL, e.g. postgres://user:password@host/db.
    #[arg(long, env = "DEMO_DATABASE_URL", hide_env_values = true, global = true, value_parser = postgres_url)]
    database_url: Option<String>,
    /// Connections in the pool.
    #[arg(long, env = "DEMO_POOL", default_value_t = 10, global = true,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    db_pool_size: u32,
}

fn postgres_url(s: &str) -> Result<String, String> {
    if s.starts_with("postgres://") { Ok(s.into()) } else { Err("expected a postgres:// URL".into()) }
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Address to listen on.
    #[arg(long, env = "DEMO_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// Largest scan, in probes.
    ///
    /// A second paragraph of help.
    #[arg(long, env = "DEMO_MAX_PROBES", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    max_probes: u64,
    /// Serve plaintext.
    #[arg(long, env = "DEMO_INSECURE", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new(),
          conflicts_with = "tls_cert")]
    insecure: bool,
    /// Serve reflection (a flag that takes true or false).
    #[arg(long, env = "DEMO_REFLECTION", default_value_t = true, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    reflection: bool,
    /// CIDRs, comma-separated.
    #[arg(long, default_value = "")]
    allow: String,
    /// Labels; the flag may repeat.
    #[arg(long, env = "DEMO_LABELS")]
    labels: Vec<String>,
    /// Ports.
    #[arg(long, value_delimiter = ',', default_value = "80,443")]
    ports: Vec<u16>,
    /// PEM certificate.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Its key.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The broker, with its password.
    #[arg(long = "amqp-url", env = "DEMO_AMQP_URL", hide_env_values = true)]
    amqp: Option<String>,
    /// More logs.
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
    #[arg(long, hide = true)]
    secret_knob: Option<u32>,
}

const SPEC: Spec =
    Spec { schema: &["serve"], config_arg: "config_file", note: "`tokens` reads the database settings." };

fn parse(args: &[&str]) -> Result<Loaded<Cli>, clap::Error> {
    super::parse::<Cli, _>(SPEC, std::iter::once("demo").chain(args.iter().copied()))
}

fn serve(args: &[&str]) -> Result<(ServeArgs, Settings), clap::Error> {
    let Loaded { cli, settings } = parse(args)?;
    match cli.command {
        Cmd::Serve(s) => Ok((s, settings)),
        other => panic!("{other:?}"),
    }
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn path(f: &tempfile::NamedTempFile) -> &str {
    f.path().to_str().unwrap()
}

#[track_caller]
fn error(args: &[&str]) -> String {
    let e = parse(args).expect_err("an error");
    assert_eq!(e.exit_code(), 2, "{e}");
    e.to_string()
}

#[test]
fn the_demo_command_line_is_well_formed() {
    Cli::command().debug_assert();
}

#[test]
fn without_a_file_it_parses_as_clap_does() {
    let (s, _) = serve(&["serve", "--max-probes", "5", "--labels", "a"]).unwrap();
    assert_eq!((s.max_probes, s.labels, s.db.config_file), (5, vec!["a".to_string()], None));
    let e = parse(&["serve", "--max-probes", "0"]).unwrap_err();
    assert_eq!(e.to_string(), Cli::try_parse_from(["demo", "serve", "--max-probes", "0"]).unwrap_err().to_string());
    assert_eq!(parse(&["serve", "--help"]).unwrap_err().kind(), ErrorKind::DisplayHelp);
    assert_eq!(parse(&["--version"]).unwrap_err().kind(), ErrorKind::DisplayVersion);
    assert!(parse(&["other", "--dir", "x"]).is_ok());
}

#[test]
fn file_values_go_through_the_flags_parsers() {
    let f = file(
        r#"
log-format = "json"
listen = "127.0.0.1:7000"
max-probes = 0x10
insecure = true
reflection = false
allow = ["10.0.0.0/8", "192.0.2.1"]
labels = ["site=lab", "zone=a"]
ports = [22, 8080]
verbose = 2
database-url = "postgres://u:pw@db/x"
db-pool-size = 3
secret-knob = 7
"#,
    );
    let loaded = parse(&["serve", "--config", path(&f)]).unwrap();
    assert_eq!(loaded.settings.config_path(), Some(f.path()));
    assert_eq!(loaded.cli.log_format, "json");
    let Cmd::Serve(s) = loaded.cli.command else { panic!() };
    assert_eq!(s.listen, "127.0.0.1:7000".parse().unwrap());
    assert_eq!(s.max_probes, 16);
    assert!(s.insecure);
    assert!(!s.reflection);
    assert_eq!(s.allow, "10.0.0.0/8,192.0.2.1");
    assert_eq!(s.labels, ["site=lab", "zone=a"]);
    assert_eq!(s.ports, [22, 8080]);
    assert_eq!(s.verbose, 2);
    assert_eq!(s.db.database_url.as_deref(), Some("postgres://u:pw@db/x"));
    assert_eq!(s.db.db_pool_size, 3);
    assert_eq!(s.secret_knob, Some(7));
}

#[test]
fn flags_beat_the_file_lists_included() {
    let f = file("max-probes = 5\nlabels = [\"file=1\", \"file=2\"]\ninsecure = false\nlisten = \"127.0.0.1:1\"\n");
    let (s, _) =
        serve(&["serve", "--max-probes", "7", "--config", path(&f), "--labels", "flag=1", "--insecure"]).unwrap();
    assert_eq!(s.max_probes, 7);
    assert_eq!(s.labels, ["flag=1"]);
    assert!(s.insecure);
    assert_eq!(s.listen.port(), 1);
    // The file's name from the flag or the environment alike; the flag
    // may come after the subcommand's other flags or before them.
    let (s, _) = serve(&["serve", "--config", path(&f)]).unwrap();
    assert_eq!((s.max_probes, s.labels.len(), s.insecure), (5, 2, false));
}

/// The environment is per process (and changing it races other tests),
/// so this test runs itself again as a child with variables set.
#[test]
fn env_beats_the_file_and_flags_beat_env() {
    const TEST: &str = "config_file::tests::env_beats_the_file_and_flags_beat_env";
    if std::env::var_os("DEMO_CHILD").is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--test-threads=1", "--nocapture"])
            .env("DEMO_CHILD", "1")
            .env("DEMO_MAX_PROBES", "6")
            .env("DEMO_LABELS", "env=1")
            .env("DEMO_INSECURE", "0")
            .env("DEMO_POOL", "4")
            .env("DEMO_DATABASE_URL", "postgres://env:envpw@db/x")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("1 passed"), "{text}{}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    let f = file(
        "max-probes = 5\ndb-pool-size = 3\nlabels = [\"file=1\"]\ninsecure = true\nlisten = \"127.0.0.1:1\"\n\
         database-url = \"postgres://file@db/x\"\n",
    );
    let (s, loaded) = serve(&["serve", "--config", path(&f), "--db-pool-size", "2"]).unwrap();
    assert_eq!(s.max_probes, 6, "env over file");
    assert_eq!(s.db.db_pool_size, 2, "flag over env over file");
    assert_eq!(s.labels, ["env=1"], "env replaces the file's list");
    assert!(!s.insecure, "DEMO_INSECURE=0 over insecure = true");
    assert_eq!(s.listen.port(), 1, "file over default");
    let shown = loaded.effective();
    assert!(shown.contains("max-probes = 6  # env DEMO_MAX_PROBES\n"), "{shown}");
    assert!(shown.contains("db-pool-size = 2  # flag\n"), "{shown}");
    assert!(shown.contains("# database-url = (set; secret, not shown)  # env DEMO_DATABASE_URL\n"), "{shown}");
    assert!(!shown.contains("envpw"), "{shown}");
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let f = file("listen = \"127.0.0.1:1\"\n\nmax-probs = 1\n");
    let e = error(&["serve", "--config", path(&f)]);
    assert!(e.contains(&format!("{}:3: `max-probs`: unknown key (did you mean `max-probes`?)", path(&f))), "{e}");
    // An environment variable's name is not a key, but points at one.
    let f = file("DEMO_LISTEN = \"127.0.0.1:1\"\n");
    let e = error(&["serve", "--config", path(&f)]);
    assert!(e.contains("`DEMO_LISTEN`: unknown key (did you mean `listen`?)"), "{e}");
    let f = file("[amqp]\nnope = 1\n");
    let e = error(&["serve", "--config", path(&f)]);
    assert!(e.contains(":2: `amqp.nope`: unknown key"), "{e}");
    let f = file("zzz = 1\n");
    let e = error(&["serve", "--config", path(&f)]);
    assert!(e.contains("`zzz`: unknown key (keys are the long flag names"), "{e}");
    // Unknown to the schema is unknown to every subcommand reading it.
    let e = error(&["tokens", "list", "--config", path(&f)]);
    assert!(e.contains("`zzz`: unknown key"), "{e}");
    // Nor may a file name another file, or set help.
    for text in ["config = \"other.toml\"\n", "help = true\n"] {
        let f = file(text);
        let e = error(&["serve", "--config", path(&f)]);
        assert!(e.contains(&format!("{}:1: `", path(&f))), "{e}");
    }
}

#[test]
fn wrong_values_name_the_file_line_and_key() {
    let f = file("# comment\nmax-probes = \"lots\"\n");
    let e = error(&["serve", "--config", path(&f)]);
    assert!(
        e.contains(&format!(
            "{}:2: `max-probes`: invalid value 'lots' for '--max-probes <MAX_PROBES>': invalid digit",
            path(&f)
        )),
        "{e}"
    );
    let f = file("max-probes = 0\n");
    let e = error(&["serve", "--config", path(&f)]);
    assert!(e.contains(":1: `max-probes`: invalid value '0' for '--max-probes <MAX_PROBES>'"), "{e}");
    let f = file("listen = 5\n");
    assert!(error(&["serve", "--config", path(&f)]).contains("`listen`: invalid value '5' for '--listen <LISTEN>'"));
    let f = file("insecure = \"yes\"\n");
    assert!(error(&["serve", "--config", path(&f)]).contains(":1: `insecure`: expected true or false"));
    let f = file("reflection = \"maybe\"\n");
    assert!(error(&["serve", "--config", path(&f)]).contains("`reflection`: invalid value 'maybe'"));
    let f = file("log-format = \"xml\"\n");
    let e = error(&["serve", "--config", path(&f)]);
    assert!(e.contains("`log-format`: invalid value 'xml' for '--log-format <LOG_FORMAT>'"), "{e}");
    let f = file("ports = [22, \"ssh\"]\n");
    assert!(error(&["serve", "--config", path(&f)]).contains("`ports`: invalid value 'ssh'"));
    let f = file("labels = [[\"a\"]]\n");
    assert!(error(&["serve", "--config", path(&f)]).contains(":1: labels: a list may hold only"));
    let f = file("verbose = \"loud\"\n");
    assert!(error(&["serve", "--config", path(&f)]).contains("`verbose`: expected a count"));
    // A secret's rejected value is not echoed.
    let f = file("database-url = \"mysql://root:hunter2@db/x\"\n");
    let e = error(&["serve", "--config", path(&f)]);
    assert!(e.contains("`database-url`: invalid value '(secret)'") && !e.contains("hunter2"), "{e}");
    // A flag's own mistake is reported as clap reports it.
    let f = file("max-probes = 5\n");
    let e = error(&["serve", "--config", path(&f), "--max-probes", "x"]);
    assert!(e.starts_with("error: invalid value 'x' for '--max-probes <MAX_PROBES>'"), "{e}");
}

#[test]
fn broken_and_missing_files_name_the_file() {
    let f = file("listen = \n");
    let e = error(&["serve", "--config", path(&f)]);
    assert!(e.contains(path(&f)) && e.contains("TOML parse error at line 1"), "{e}");
    let e = error(&["serve", "--config", "/nonexistent/demo.toml"]);
    assert!(e.contains("cannot read config file /nonexistent/demo.toml: No such file"), "{e}");
}

#[test]
fn booleans_set_flags_and_are_values_of_flags_that_take_one() {
    for (text, insecure, reflection) in [
        ("insecure = true", true, true),
        ("insecure = false", false, true),
        ("reflection = false", false, false),
        ("reflection = \"off\"", false, false),
        ("reflection = true", false, true),
    ] {
        let f = file(text);
        let (s, _) = serve(&["serve", "--config", path(&f)]).unwrap();
        assert_eq!((s.insecure, s.reflection), (insecure, reflection), "{text}");
    }
}

#[test]
fn lists_repeat_or_join_as_the_flag_takes_them() {
    let f = file("labels = [\"a=1\", \"b=2\"]\nports = [1, 2, 3]\nallow = [\"10.0.0.0/8\", \"::1\"]\n");
    let (s, _) = serve(&["serve", "--config", path(&f)]).unwrap();
    assert_eq!(s.labels, ["a=1", "b=2"]);
    assert_eq!(s.ports, [1, 2, 3]);
    assert_eq!(s.allow, "10.0.0.0/8,::1");
    let f = file("labels = \"one=1\"\nports = \"7,8\"\nallow = []\n");
    let (s, _) = serve(&["serve", "--config", path(&f)]).unwrap();
    assert_eq!(s.labels, ["one=1"]);
    assert_eq!(s.ports, [7, 8]);
    assert_eq!(s.allow, "");
}

#[test]
fn tables_are_prefixes_and_snake_case_keys_work() {
    let f = file("max_probes = 9\n[db]\npool_size = 3\n[amqp]\nurl = \"amqp://broker\"\n");
    let (s, _) = serve(&["serve", "--config", path(&f)]).unwrap();
    assert_eq!((s.max_probes, s.db.db_pool_size, s.amqp.as_deref()), (9, 3, Some("amqp://broker")));
    let f = file("amqp.url = \"amqp://dotted\"\n");
    assert_eq!(serve(&["serve", "--config", path(&f)]).unwrap().0.amqp.as_deref(), Some("amqp://dotted"));
    let f = file("max_probes = 9\nmax-probes = 8\n");
    let e = error(&["serve", "--config", path(&f)]);
    assert!(
        e.contains(":2: `max_probes` sets the same setting as `max-probes`") || e.contains(":1: `max_probes`"),
        "{e}"
    );
}

#[test]
fn requires_and_conflicts_hold_for_file_values() {
    let f = file("tls-cert = \"c.pem\"\n");
    let e = error(&["serve", "--config", path(&f)]);
    assert!(e.contains("--tls-key"), "{e}");
    let f = file("insecure = true\n");
    let e = error(&["serve", "--config", path(&f), "--tls-cert", "c.pem", "--tls-key", "k.pem"]);
    assert!(e.contains(":1: `insecure`: the argument '--tls-cert <TLS_CERT>' cannot be used with '--insecure'"), "{e}");
    let f = file("tls-cert = \"c.pem\"\ntls-key = \"k.pem\"\n");
    let (s, _) = serve(&["serve", "--config", path(&f)]).unwrap();
    assert_eq!(s.tls_key, Some(PathBuf::from("k.pem")));
}

#[test]
fn other_subcommands_read_the_keys_they_share() {
    let f = file("listen = \"127.0.0.1:1\"\nmax-probes = 5\ndb-pool-size = 3\nlog-format = \"json\"\n");
    for args in [
        &["tokens", "list", "--config", path(&f)][..],
        &["tokens", "--config", path(&f), "list"],
        &["tokens", "--config", path(&f), "revoke", "--", "5"],
    ] {
        let loaded = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(loaded.cli.log_format, "json");
        let Cmd::Tokens { db, .. } = loaded.cli.command else { panic!() };
        assert_eq!(db.db_pool_size, 3, "{args:?}");
    }
    // A subcommand without the config flag never reads one.
    assert!(parse(&["other"]).is_ok());
}

/// `--controller` is required; a file can supply it.
#[derive(Parser, Debug)]
#[command(name = "agent")]
struct AgentCli {
    #[command(subcommand)]
    command: AgentCmd,
}

#[derive(Subcommand, Debug)]
enum AgentCmd {
    Run {
        #[arg(long = "config")]
        config_file: Option<PathBuf>,
        /// The controller.
        #[arg(long)]
        controller: String,
    },
}

#[test]
fn a_required_flag_may_come_from_the_file() {
    let spec = Spec { schema: &["run"], config_arg: "config_file", note: "" };
    let run = |args: &[&str]| super::parse::<AgentCli, _>(spec, std::iter::once("agent").chain(args.iter().copied()));
    let f = file("controller = \"http://c:1\"\n");
    let AgentCmd::Run { controller, .. } = run(&["run", "--config", path(&f)]).unwrap().cli.command;
    assert_eq!(controller, "http://c:1");
    let e = run(&["run"]).unwrap_err().to_string();
    assert!(e.contains("the following required arguments were not provided") && e.contains("--controller"), "{e}");
    let text = default_file(AgentCli::command(), spec);
    assert!(text.contains("# The controller\n# Required.\n# controller = \"<CONTROLLER>\"\n"), "{text}");
}

/// The `key = value` settings of a commented default file, uncommented.
fn uncommented_defaults(text: &str) -> String {
    let mut out = String::new();
    let mut has_default = true;
    for line in text.lines() {
        if line.starts_with("# ") && (line.contains("Not set by default.") || line.contains("Required.")) {
            has_default = false;
        }
        if line.is_empty() {
            has_default = true;
        }
        if let Some(setting) = line.strip_prefix("# ").filter(|l| has_default && l.contains(" = ")) {
            out.push_str(setting);
            out.push('\n');
        }
    }
    out
}

/// Settings shown by `effective_settings`, without their sources.
fn values(shown: &str) -> Vec<String> {
    shown
        .lines()
        .filter(|l| !l.starts_with("# Effective") && !l.starts_with("# Each"))
        .map(|l| l.split("  # ").next().unwrap().to_string())
        .collect()
}

#[test]
fn the_default_file_is_all_comments_and_loads_back_as_the_defaults() {
    let text = default_file(Cli::command(), SPEC);
    // Valid TOML that sets nothing.
    let doc = DeTable::parse(&text).unwrap();
    assert!(doc.get_ref().is_empty(), "{text}");
    assert!(text.lines().all(|l| l.is_empty() || l.starts_with('#')), "{text}");
    // Every setting of the schema, with its help, env var and default;
    // not the config flag itself, help or hidden settings.
    let mut cmd = Cli::command();
    cmd.build();
    let serve = cmd.find_subcommand("serve").unwrap();
    let listed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# ")?.split_once(" = ").map(|(k, _)| k))
        .filter(|k| !k.contains(' '))
        .collect();
    let expected: Vec<&str> = serve
        .get_arguments()
        .filter(|a| is_setting(a) && a.get_id() != "config_file" && !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .collect();
    assert_eq!(listed, expected, "{text}");
    assert!(listed.contains(&"log-format") && !listed.contains(&"secret-knob") && !listed.contains(&"config"));
    let header: Vec<&str> = text.lines().take_while(|l| !l.is_empty()).map(|l| &l[2..]).collect();
    let header = header.join(" ");
    let start = "Configuration file of `demo serve` (TOML), read with `--config FILE` (or DEMO_CONFIG=FILE).";
    assert!(header.starts_with(start), "{text}");
    let end = "Generated by `demo config print-default`. `tokens` reads the database settings.";
    assert!(header.ends_with(end), "{text}");
    assert!(
        text.contains(
            "\n# Largest scan, in probes.\n#\n# A second paragraph of help.\n# Env: DEMO_MAX_PROBES.\n# max-probes = 1000\n"
        ),
        "{text}"
    );
    assert!(text.contains("# Env: DEMO_LOG_FORMAT. One of: plain, json.\n# log-format = \"plain\"\n"), "{text}");
    assert!(text.contains("# Serve plaintext\n# Env: DEMO_INSECURE.\n# insecure = false\n"), "{text}");
    assert!(text.contains("# Env: DEMO_REFLECTION. One of: true, false.\n# reflection = true\n"), "{text}");
    assert!(text.contains("# ports = [80, 443]\n") && text.contains("# allow = \"\"\n"), "{text}");
    assert!(text.contains("# Env: DEMO_LABELS. Not set by default.\n# labels = [\"<LABELS>\"]\n"), "{text}");
    assert!(text.contains("# Not set by default.\n# tls-cert = \"<TLS_CERT>\"\n"), "{text}");
    assert!(text.contains("# verbose = 0\n"), "{text}");
    assert!(text.lines().all(|l| l.len() <= 82), "{text}");

    // Loaded as it is and with every default uncommented: the defaults.
    let plain = serve_settings(&[]);
    let f = file(&text);
    assert_eq!(serve_settings(&["--config", path(&f)]), plain);
    let uncommented = uncommented_defaults(&text);
    assert!(uncommented.contains("max-probes = 1000\n") && !uncommented.contains("tls-cert"), "{uncommented}");
    let f = file(&uncommented);
    assert_eq!(serve_settings(&["--config", path(&f)]), plain);
}

fn serve_settings(extra: &[&str]) -> Vec<String> {
    let mut args = vec!["serve"];
    args.extend_from_slice(extra);
    values(&serve(&args).unwrap().1.effective())
}

#[test]
fn effective_settings_name_their_sources_hide_secrets_and_load_back() {
    let f = file("max-probes = 5\ndatabase-url = \"postgres://u:hunter2@db/x\"\nlabels = [\"a=1\", \"b=2\"]\n");
    let args = ["serve", "--config", path(&f), "--listen", "10.0.0.1:5", "--amqp-url", "amqp://u:pw2@b"];
    let (_, loaded) = serve(&args).unwrap();
    let shown = loaded.effective();
    assert!(shown.starts_with(&format!("# Effective settings of `demo serve` (config file: {}).\n", path(&f))));
    assert!(shown.contains("listen = \"10.0.0.1:5\"  # flag\n"), "{shown}");
    assert!(shown.contains(&format!("max-probes = 5  # file {}\n", path(&f))), "{shown}");
    assert!(shown.contains(&format!("labels = [\"a=1\", \"b=2\"]  # file {}\n", path(&f))), "{shown}");
    assert!(shown.contains("db-pool-size = 10  # default\n"), "{shown}");
    assert!(shown.contains("insecure = false  # default\n"), "{shown}");
    assert!(shown.contains("ports = [80, 443]  # default\n"), "{shown}");
    assert!(shown.contains("# tls-cert: not set\n"), "{shown}");
    assert!(shown.contains(&format!("# database-url = (set; secret, not shown)  # file {}\n", path(&f))), "{shown}");
    assert!(shown.contains("# amqp-url = (set; secret, not shown)  # flag\n"), "{shown}");
    assert!(!shown.contains("hunter2") && !shown.contains("pw2") && !shown.contains("\nconfig"), "{shown}");
    // What it shows is itself a config file for the same settings.
    let again = file(&shown);
    let (_, reloaded) = serve(&["serve", "--config", path(&again)]).unwrap();
    let secret = |l: &String| l.starts_with("# database-url") || l.starts_with("# amqp-url");
    let without_secrets = |v: Vec<String>| v.into_iter().filter(|l| !secret(l)).collect::<Vec<_>>();
    assert_eq!(without_secrets(values(&reloaded.effective())), without_secrets(values(&shown)));
}
