//! Config files for the portfleet binaries: a TOML file of settings, read
//! through the binary's own clap definitions so that there is one schema,
//! one set of parsers and one validation for flags, environment variables
//! and the file.
//!
//! - Keys are the long flag names of one subcommand (the *schema*, e.g. the
//!   controller's `serve`): `max-scan-probes = 1000`. `snake_case` keys
//!   work too (`_` reads as `-`), and a table is a prefix: `[amqp]` with
//!   `url = ".."` (or the dotted key `amqp.url`) sets `amqp-url`.
//! - Precedence: file < environment < flag. A key whose flag was given on
//!   the command line or through its environment variable is left out
//!   whole (lists included); every other key becomes a `--key=value`
//!   argument, so a file's value meets exactly the parser, range checks,
//!   `requires` and `conflicts_with` rules a flag does, and an error names
//!   the file, the line and the key.
//! - Other subcommands whose arguments include the config flag read the
//!   keys they share with the schema (the controller's `migrate` and
//!   `tokens` take its database settings) and skip the rest; a key the
//!   schema does not know is an error everywhere, with the closest key
//!   suggested.
//! - [`default_file`] writes a commented default file from the same
//!   definitions (help, environment variable, default), so it cannot go
//!   stale; [`Settings::effective`] prints what a run would use and
//!   where each value came from, never showing a secret (an argument with
//!   `hide_env_values`).
//!
//! Values: strings and integers are passed as written; booleans set
//! `SetTrue`/`SetFalse` flags (`insecure = true` is `--insecure`) and are
//! `true`/`false` for flags that take a value; a list repeats a flag that
//! may repeat, and is joined with the flag's value delimiter, or with `,`
//! (the separator of portfleet's list flags, e.g. `--allow A,B`), for a
//! flag that takes one value.
//!
//! Why `toml` and not `figment`: clap already owns the environment and
//! flag layers and their precedence; figment's work (merging providers,
//! then extracting a serde struct) would need a second, serde schema of
//! every setting beside clap's, which is what this module avoids. All that
//! is needed is a parsed document with positions for error messages, which
//! `toml`'s `DeTable` gives.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use clap::{
    Arg, ArgAction, ArgMatches, Command, Parser,
    error::{ContextKind, ContextValue, ErrorKind},
    parser::ValueSource,
};
use toml::de::{DeTable, DeValue};

/// Which arguments a binary's config file holds and which one names it.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// The subcommand whose arguments are the file's keys, e.g. `["serve"]`.
    pub schema: &'static [&'static str],
    /// Id of the argument that names the file (`--config`); the
    /// subcommands that have it read the file.
    pub config_arg: &'static str,
    /// Said at the top of [`default_file`]'s output, after the generic
    /// text (e.g. which other subcommands read the file); may be empty.
    pub note: &'static str,
}

/// A parsed command line, with the config file's settings applied.
#[derive(Debug)]
pub struct Loaded<T> {
    pub cli: T,
    /// Where each setting came from, for `config check`.
    pub settings: Settings,
}

/// The settings of a parsed command line and their sources.
#[derive(Debug)]
pub struct Settings {
    /// Built, for introspection.
    cmd: Command,
    matches: ArgMatches,
    spec: Spec,
    /// The config file, when one was read.
    file: Option<PathBuf>,
    /// Ids of the arguments the file set, with the key as written.
    from_file: BTreeMap<String, String>,
}

impl Settings {
    /// The config file read, if any.
    pub fn config_path(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The settings of the subcommand that ran, as TOML: one
    /// `key = value  # source` line per setting (source: `flag`,
    /// `env NAME`, `file PATH`, `default`); settings that are not set, and
    /// secrets, as comments. Read back as a config file, it gives the same
    /// settings (but the secrets).
    pub fn effective(&self) -> String {
        let (path, matches) = leaf_matches(&self.matches);
        let Some(leaf) = find_path(&self.cmd, &path) else { return String::new() };
        let mut out = String::new();
        let file = self.file.as_ref().map_or("none".to_string(), |p| p.display().to_string());
        let _ = writeln!(out, "# Effective settings of `{}` (config file: {file}).", command_line(&self.cmd, &path));
        out.push_str("# Each line says where its value comes from: flag > env > file > default.\n");
        for arg in setting_args(leaf, &self.spec) {
            let key = arg.get_long().unwrap_or_default();
            let id = arg.get_id().as_str();
            let source = match (self.from_file.get(id), matches.value_source(id)) {
                (Some(_), _) => format!("file {file}"),
                (None, Some(ValueSource::CommandLine)) => "flag".to_string(),
                (None, Some(ValueSource::EnvVariable)) => {
                    format!("env {}", arg.get_env().map(|e| e.to_string_lossy()).unwrap_or_default())
                }
                (None, Some(_)) => "default".to_string(),
                (None, None) => {
                    let _ = writeln!(out, "# {key}: not set");
                    continue;
                }
            };
            if arg.is_hide_env_values_set() {
                let _ = writeln!(out, "# {key} = (set; secret, not shown)  # {source}");
                continue;
            }
            match current_value(arg, matches) {
                Some(value) => {
                    let _ = writeln!(out, "{key} = {value}  # {source}");
                }
                None => {
                    let _ = writeln!(out, "# {key}: not set");
                }
            }
        }
        out
    }
}

/// Parses `args` (the program name first) as `T`, with the config file's
/// settings applied when the subcommand has [`Spec::config_arg`] and it is
/// set (by flag or environment). Errors are clap errors: `.exit()` prints
/// them and exits 2 (0 for `--help` and `--version`).
pub fn parse<T, I>(spec: Spec, args: I) -> Result<Loaded<T>, clap::Error>
where
    T: Parser,
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let argv: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let loaded = |matches: ArgMatches, file, from_file| {
        let cli = T::from_arg_matches(&matches).map_err(|e| e.format(&mut T::command()))?;
        let mut cmd = T::command();
        cmd.build();
        Ok(Loaded { cli, settings: Settings { cmd, matches, spec, file, from_file } })
    };
    // A first pass only to learn the subcommand, the config file's name
    // and which settings the command line and environment already give;
    // its errors (a missing required flag the file may supply) do not
    // count, and the real parse below reports whatever is still wrong.
    let first = T::command().ignore_errors(true).try_get_matches_from(&argv)?;
    let mut cmd = T::command();
    cmd.build();
    let (path, given) = leaf_matches(&first);
    let Some(leaf) = find_path(&cmd, &path) else {
        return loaded(T::command().try_get_matches_from(argv)?, None, BTreeMap::new());
    };
    let file = leaf
        .get_arguments()
        .any(|a| a.get_id() == spec.config_arg)
        .then(|| given.try_get_raw(spec.config_arg).ok().flatten().and_then(|mut v| v.next()).map(PathBuf::from))
        .flatten();
    let Some(file) = file else { return loaded(T::command().try_get_matches_from(argv)?, None, BTreeMap::new()) };
    let schema = find_path(&cmd, spec.schema)
        .unwrap_or_else(|| panic!("config file schema {:?} is not a subcommand", spec.schema));

    let text = std::fs::read_to_string(&file)
        .map_err(|e| clap::Error::raw(ErrorKind::Io, format!("cannot read config file {}: {e}\n", file.display())))?;
    let entries = entries(&text).map_err(|e| file_error(&file, e))?;
    let schema_keys = keys(schema, &spec);
    let config_long = leaf.get_arguments().find(|a| a.get_id() == spec.config_arg).and_then(|a| a.get_long());
    let config_long = config_long.map(str::to_string);
    let leaf_keys = keys(leaf, &spec);
    let mut extra = Vec::new();
    let mut from_file = BTreeMap::new();
    for entry in &entries {
        let at = Located { file: &file, line: entry.line, key: &entry.key };
        if config_long.as_deref() == Some(entry.name.as_str()) {
            return Err(at.error(ErrorKind::UnknownArgument, "a config file cannot name another config file"));
        }
        if !schema_keys.contains_key(&entry.name) {
            return Err(at.error(ErrorKind::UnknownArgument, &unknown_key(&entry.name, &schema_keys)));
        }
        // A setting of the schema this subcommand does not take.
        let Some(arg) = leaf_keys.get(&entry.name) else { continue };
        let id = arg.get_id().as_str();
        if matches!(given.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        extra.extend(arguments(arg, &entry.value).map_err(|e| at.error(ErrorKind::InvalidValue, &e))?);
        from_file.insert(id.to_string(), entry.key.clone());
    }
    // After the user's own arguments (before a `--`), so clap meets and
    // reports a mistake of theirs first; none of them sets what these set.
    let at = argv.iter().skip(1).position(|a| a == "--").map_or(argv.len(), |i| i + 1);
    let argv: Vec<OsString> = argv[..at].iter().cloned().chain(extra).chain(argv[at..].iter().cloned()).collect();
    let matches =
        T::command().try_get_matches_from(argv).map_err(|e| attribute(e, leaf, &from_file, &entries, &file))?;
    loaded(matches, Some(file), from_file)
}

/// A commented default config file for `cmd`: every setting of the
/// schema with its help, environment variable and default, commented out.
pub fn default_file(mut cmd: Command, spec: Spec) -> String {
    cmd.build();
    let schema = find_path(&cmd, spec.schema)
        .unwrap_or_else(|| panic!("config file schema {:?} is not a subcommand", spec.schema));
    let name = command_line(&cmd, &spec.schema.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let env = schema
        .get_arguments()
        .find(|a| a.get_id() == spec.config_arg)
        .and_then(|a| a.get_env())
        .map(|e| format!(" (or {}=FILE)", e.to_string_lossy()))
        .unwrap_or_default();
    let mut out = String::new();
    let mut header = format!(
        "Configuration file of `{name}` (TOML), read with `--config FILE`{env}. Keys are the long flag names \
         (`snake_case` works too); a flag or environment variable overrides the file's value. Every setting \
         below is commented out at its default. Generated by `{} config print-default`.",
        cmd.get_name()
    );
    if !spec.note.is_empty() {
        header = format!("{header} {}", spec.note);
    }
    comment(&mut out, &header);
    for arg in setting_args(schema, &spec) {
        out.push('\n');
        let key = arg.get_long().unwrap_or_default();
        let help = arg.get_long_help().or(arg.get_help()).map(|h| h.to_string()).unwrap_or_default();
        comment(&mut out, &help);
        let mut facts = Vec::new();
        if let Some(env) = arg.get_env() {
            facts.push(format!("Env: {}.", env.to_string_lossy()));
        }
        let values: Vec<String> =
            arg.get_possible_values().iter().filter(|v| !v.is_hide_set()).map(|v| v.get_name().to_string()).collect();
        if !values.is_empty() && !is_flag(arg) {
            facts.push(format!("One of: {}.", values.join(", ")));
        }
        let defaults: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
        if arg.is_required_set() {
            facts.push("Required.".into());
        } else if defaults.is_empty() && !is_flag(arg) {
            facts.push("Not set by default.".into());
        }
        if !facts.is_empty() {
            comment(&mut out, &facts.join(" "));
        }
        let value = if is_flag(arg) {
            // SetTrue's default is false, SetFalse's true.
            (!matches!(arg.get_action(), ArgAction::SetTrue)).to_string()
        } else if defaults.is_empty() {
            let placeholder = arg
                .get_value_names()
                .and_then(|n| n.first())
                .map_or_else(|| key.to_uppercase().replace('-', "_"), |n| n.to_string());
            let placeholder = toml_string(&format!("<{placeholder}>"));
            if repeats(arg) { format!("[{placeholder}]") } else { placeholder }
        } else {
            render_values(arg, &defaults)
        };
        let _ = writeln!(out, "# {key} = {value}");
    }
    out
}

/// One setting of a file: its key as written (`amqp.url`), the flag it
/// names (`amqp-url`), its line and value.
#[derive(Debug)]
struct Entry {
    key: String,
    name: String,
    line: usize,
    value: FileValue,
}

#[derive(Debug, Clone, PartialEq)]
enum FileValue {
    Bool(bool),
    /// Strings, integers, floats and datetimes, as text.
    Text(String),
    List(Vec<FileValue>),
}

/// The settings of a TOML document, tables flattened into prefixes; the
/// error has a line number when one is known.
fn entries(text: &str) -> Result<Vec<Entry>, (Option<usize>, String)> {
    let doc = DeTable::parse(text).map_err(|e| (None, e.to_string()))?;
    let mut out = Vec::new();
    flatten(text, doc.get_ref(), "", "", &mut out)?;
    let mut seen = BTreeMap::new();
    for e in &out {
        if let Some(first) = seen.insert(e.name.clone(), e.key.clone()) {
            return Err((
                Some(e.line),
                format!("`{}` sets the same setting as `{first}` (`_` and `-` are the same in keys)", e.key),
            ));
        }
    }
    Ok(out)
}

fn flatten(
    text: &str,
    table: &DeTable<'_>,
    key_prefix: &str,
    name_prefix: &str,
    out: &mut Vec<Entry>,
) -> Result<(), (Option<usize>, String)> {
    for (k, v) in table {
        let key = format!("{key_prefix}{}", k.get_ref());
        let name = format!("{name_prefix}{}", k.get_ref().replace('_', "-"));
        let line = line_of(text, k.span().start);
        match v.get_ref() {
            DeValue::Table(inner) => flatten(text, inner, &format!("{key}."), &format!("{name}-"), out)?,
            value => {
                let value = file_value(value).map_err(|e| (Some(line), format!("{key}: {e}")))?;
                out.push(Entry { key, name, line, value });
            }
        }
    }
    Ok(())
}

fn file_value(v: &DeValue<'_>) -> Result<FileValue, String> {
    Ok(match v {
        DeValue::String(s) => FileValue::Text(s.to_string()),
        DeValue::Integer(i) => FileValue::Text(
            i128::from_str_radix(i.as_str(), i.radix()).map_err(|e| format!("integer {i}: {e}"))?.to_string(),
        ),
        DeValue::Float(f) => FileValue::Text(f.as_str().to_string()),
        DeValue::Boolean(b) => FileValue::Bool(*b),
        DeValue::Datetime(d) => FileValue::Text(d.to_string()),
        DeValue::Array(items) => FileValue::List(
            items
                .iter()
                .map(|i| match i.get_ref() {
                    DeValue::Array(_) | DeValue::Table(_) => {
                        Err("a list may hold only strings, numbers and booleans".into())
                    }
                    other => file_value(other),
                })
                .collect::<Result<_, String>>()?,
        ),
        DeValue::Table(_) => return Err("a table is not a value here".into()),
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// The `--flag[=value]` arguments a file's value stands for.
fn arguments(arg: &Arg, value: &FileValue) -> Result<Vec<OsString>, String> {
    let flag = format!("--{}", arg.get_long().unwrap_or_default());
    let text = |v: &FileValue| match v {
        FileValue::Bool(b) => Ok(b.to_string()),
        FileValue::Text(t) => Ok(t.clone()),
        FileValue::List(_) => Err("expected one value, not a list".to_string()),
    };
    match arg.get_action() {
        action @ (ArgAction::SetTrue | ArgAction::SetFalse) => {
            let FileValue::Bool(b) = value else { return Err("expected true or false".into()) };
            let on = matches!(action, ArgAction::SetTrue) == *b;
            Ok(if on { vec![flag.into()] } else { Vec::new() })
        }
        ArgAction::Count => {
            let n: u8 = match value {
                FileValue::Text(t) => t.parse().map_err(|_| "expected a count, 0 to 255".to_string())?,
                _ => return Err("expected a count, 0 to 255".into()),
            };
            Ok(vec![flag.into(); n.into()])
        }
        action if action.takes_values() => match value {
            FileValue::List(items) => {
                let items = items.iter().map(text).collect::<Result<Vec<_>, _>>()?;
                if matches!(action, ArgAction::Append) {
                    Ok(items.iter().map(|v| format!("{flag}={v}").into()).collect())
                } else {
                    let sep = arg.get_value_delimiter().unwrap_or(',').to_string();
                    Ok(vec![format!("{flag}={}", items.join(&sep)).into()])
                }
            }
            single => Ok(vec![format!("{flag}={}", text(single)?).into()]),
        },
        _ => Err("not a setting".into()),
    }
}

/// The file's settings, by long name, that `cmd` takes.
fn keys<'c>(cmd: &'c Command, spec: &Spec) -> BTreeMap<String, &'c Arg> {
    cmd.get_arguments()
        .filter(|a| a.get_id() != spec.config_arg)
        .filter(|a| is_setting(a))
        .filter_map(|a| Some((a.get_long()?.to_string(), a)))
        .collect()
}

/// The arguments of `cmd` a file may set, in their order of definition
/// (global ones last); hidden ones are accepted as keys but not listed.
fn setting_args<'c>(cmd: &'c Command, spec: &Spec) -> Vec<&'c Arg> {
    let keys = keys(cmd, spec);
    cmd.get_arguments().filter(|a| !a.is_hide_set() && a.get_long().is_some_and(|l| keys.contains_key(l))).collect()
}

fn is_setting(a: &Arg) -> bool {
    !a.is_positional()
        && a.get_long().is_some()
        && matches!(
            a.get_action(),
            ArgAction::Set | ArgAction::Append | ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count
        )
}

fn is_flag(a: &Arg) -> bool {
    matches!(a.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
}

/// Whether the flag's values are a list in TOML.
fn repeats(a: &Arg) -> bool {
    matches!(a.get_action(), ArgAction::Append) || a.get_value_delimiter().is_some()
}

fn unknown_key(name: &str, known: &BTreeMap<String, &Arg>) -> String {
    // An environment variable's name written as a key.
    let by_env = known
        .iter()
        .find(|(_, a)| a.get_env().is_some_and(|e| e.to_string_lossy().eq_ignore_ascii_case(&name.replace('-', "_"))));
    let closest = by_env.map(|(k, _)| k.as_str()).or_else(|| {
        known
            .keys()
            .map(|k| (strsim::jaro(name, k), k))
            .filter(|(score, _)| *score > 0.8)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, k)| k.as_str())
    });
    match closest {
        Some(k) => format!("unknown key (did you mean `{k}`?)"),
        None => "unknown key (keys are the long flag names, see `config print-default`)".into(),
    }
}

struct Located<'a> {
    file: &'a Path,
    line: usize,
    key: &'a str,
}

impl Located<'_> {
    fn error(&self, kind: ErrorKind, message: &str) -> clap::Error {
        clap::Error::raw(kind, format!("{}:{}: `{}`: {message}\n", self.file.display(), self.line, self.key))
    }
}

fn file_error(file: &Path, (line, message): (Option<usize>, String)) -> clap::Error {
    let at = line.map(|l| format!(":{l}")).unwrap_or_default();
    clap::Error::raw(ErrorKind::InvalidValue, format!("{}{at}: {}\n", file.display(), message.trim_end()))
}

/// A parse error caused by a value from the file, with the file, line and
/// key in front of clap's message; any other error as it is.
fn attribute(
    error: clap::Error,
    leaf: &Command,
    from_file: &BTreeMap<String, String>,
    entries: &[Entry],
    file: &Path,
) -> clap::Error {
    let named: Vec<&str> = [ContextKind::InvalidArg, ContextKind::PriorArg]
        .into_iter()
        .filter_map(|k| error.get(k))
        .flat_map(|v| match v {
            ContextValue::String(s) => vec![s.as_str()],
            ContextValue::Strings(s) => s.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        })
        .collect();
    let culprit = leaf
        .get_arguments()
        .find(|a| from_file.contains_key(a.get_id().as_str()) && named.iter().any(|n| *n == a.to_string()));
    let Some(arg) = culprit else { return error };
    let key = &from_file[arg.get_id().as_str()];
    let line = entries.iter().find(|e| &e.key == key).map_or(0, |e| e.line);
    let rendered = error.render().to_string();
    let mut message =
        rendered.trim_start_matches("error: ").split("\n\n").next().unwrap_or_default().trim().to_string();
    if arg.is_hide_env_values_set() {
        // Never echo a secret (a database URL's password) from the file.
        if let Some(ContextValue::String(v)) = error.get(ContextKind::InvalidValue)
            && !v.is_empty()
        {
            message = message.replace(v.as_str(), "(secret)");
        }
    }
    Located { file, line, key }.error(error.kind(), &message)
}

/// The deepest subcommand of `matches`: its path and matches.
fn leaf_matches(matches: &ArgMatches) -> (Vec<String>, &ArgMatches) {
    let mut path = Vec::new();
    let mut m = matches;
    while let Some((name, sub)) = m.subcommand() {
        path.push(name.to_string());
        m = sub;
    }
    (path, m)
}

fn find_path<'c>(cmd: &'c Command, path: &[impl AsRef<str>]) -> Option<&'c Command> {
    path.iter().try_fold(cmd, |c, name| c.find_subcommand(name.as_ref()))
}

fn command_line(cmd: &Command, path: &[String]) -> String {
    std::iter::once(cmd.get_name()).chain(path.iter().map(String::as_str)).collect::<Vec<_>>().join(" ")
}

/// A setting's value in the final matches, as TOML.
fn current_value(arg: &Arg, matches: &ArgMatches) -> Option<String> {
    let id = arg.get_id().as_str();
    if let Ok(Some(b)) = matches.try_get_one::<bool>(id) {
        return Some(b.to_string());
    }
    let raw: Vec<String> = matches.try_get_raw(id).ok().flatten()?.map(|v| v.to_string_lossy().into_owned()).collect();
    Some(render_values(arg, &raw))
}

/// Values as TOML: a list for a flag that repeats or has a delimiter,
/// else one value; numbers and booleans bare, everything else a string.
fn render_values(arg: &Arg, values: &[String]) -> String {
    let boolean = is_flag(arg) || {
        let names: Vec<String> =
            arg.get_possible_values().iter().filter(|v| !v.is_hide_set()).map(|v| v.get_name().to_string()).collect();
        names == ["true", "false"]
    };
    let one = |v: &String| match (v.parse::<i64>(), v.parse::<bool>()) {
        (Ok(n), _) if n.to_string() == *v => v.clone(),
        (_, Ok(b)) if boolean => b.to_string(),
        _ => toml_string(v),
    };
    let values: Vec<String> = match arg.get_value_delimiter() {
        // Defaults are given joined ("80,443").
        Some(d) => values.iter().flat_map(|v| v.split(d)).filter(|v| !v.is_empty()).map(str::to_string).collect(),
        None => values.to_vec(),
    };
    match &values[..] {
        [v] if !repeats(arg) => one(v),
        vs => format!("[{}]", vs.iter().map(one).collect::<Vec<_>>().join(", ")),
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `text` as `#` comment lines of at most about 80 characters, paragraphs
/// kept.
fn comment(out: &mut String, text: &str) {
    for (i, paragraph) in text.split("\n\n").enumerate() {
        if i > 0 {
            out.push_str("#\n");
        }
        let mut line = String::new();
        for word in unbroken_words(paragraph) {
            if !line.is_empty() && line.len() + 1 + word.len() > 78 {
                let _ = writeln!(out, "# {line}");
                line.clear();
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&word);
        }
        if !line.is_empty() {
            let _ = writeln!(out, "# {line}");
        }
    }
}

/// Words, with a `code span` kept as one.
fn unbroken_words(text: &str) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut open = false;
    for word in text.split_whitespace() {
        match words.last_mut() {
            Some(last) if open => {
                last.push(' ');
                last.push_str(word);
            }
            _ => words.push(word.to_string()),
        }
        if word.matches('`').count() % 2 == 1 {
            open = !open;
        }
    }
    words
}

#[cfg(test)]
mod tests;
