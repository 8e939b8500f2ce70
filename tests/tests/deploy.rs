//! The deployment files in `deploy/`, checked by the tools that read them,
//! run as subprocesses: Kubernetes manifests against the Kubernetes schemas
//! (`kubernetes-validate`, offline) and rendered with kustomize when it is
//! installed, the compose file against the compose specification
//! (`check-jsonschema`), the systemd units with `systemd-analyze verify` and
//! `security`, the alert rules and their unit tests with `promtool`, the
//! Grafana dashboard's queries with promtool too, and every `portfleet_*`
//! metric they name against docs/operations.md, so none can drift.
//!
//! The Python tools live in the venv `scripts/services.sh`'s
//! `ensure_deploy_tools` makes (`scripts/test.sh` calls it);
//! promtool and systemd-analyze come from Debian's `prometheus` and
//! `systemd` packages. A missing tool skips its test with a message, and
//! fails it under `CI=true`. Nothing here touches the network.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The venv of `ensure_deploy_tools` (scripts/services.sh).
fn tools_venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("PORTFLEET_DEPLOY_TOOLS") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    cache.join("portfleet/deploy-tools")
}

/// A tool from the venv, or `None` (a panic under `CI=true`).
fn venv_tool(name: &str) -> Option<PathBuf> {
    let path = tools_venv().join("bin").join(name);
    let what = path.display().to_string();
    found_or_skip(
        &what,
        path.is_file().then_some(path),
        "run scripts/test.sh, whose ensure_deploy_tools makes that venv",
    )
}

/// A command on PATH (or in the sbin directories), or `None` (a panic
/// under `CI=true`).
fn system_tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = find_on_path(name);
    found_or_skip(name, found, &format!("apt-get install {package} (scripts/test.sh installs it as root)"))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn found_or_skip(name: &str, found: Option<PathBuf>, how: &str) -> Option<PathBuf> {
    if found.is_some() {
        return found;
    }
    let msg = format!("{name} is not installed: {how}");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true and {msg}");
    eprintln!("skipping: {msg}");
    None
}

/// Runs `cmd`; a failure panics with everything it printed.
#[track_caller]
fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{cmd:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
}

/// YAML files as JSON, one array of documents per file, through the venv's
/// PyYAML (what kubernetes-validate itself parses with).
fn yaml_docs(files: &[PathBuf]) -> Option<BTreeMap<PathBuf, Vec<Value>>> {
    let python = venv_tool("python3")?;
    const TO_JSON: &str = "import json, sys, yaml\n\
        json.dump({f: list(yaml.safe_load_all(open(f))) for f in sys.argv[1:]}, sys.stdout)";
    let out = run_ok("yaml to json", Command::new(python).arg("-c").arg(TO_JSON).args(files));
    let parsed: BTreeMap<String, Vec<Value>> = serde_json::from_str(&out).expect("json from python");
    Some(
        parsed
            .into_iter()
            .map(|(f, docs)| (PathBuf::from(f), docs.into_iter().filter(|d| !d.is_null()).collect()))
            .collect(),
    )
}

fn yaml_doc(file: &Path) -> Option<Value> {
    let mut docs = yaml_docs(&[file.to_path_buf()])?;
    let mut docs = docs.remove(file).expect("the file's documents");
    assert_eq!(docs.len(), 1, "{}: expected one YAML document", file.display());
    docs.pop()
}

fn yaml_files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "kustomization.yaml")
}

/// The schema this repository has for a custom resource (a missing one
/// fails the test); `None` for built-in kinds.
fn crd_schema(doc: &Value) -> Option<PathBuf> {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    // Built-in groups: none (v1), a bare name (apps/v1) or *.k8s.io.
    let group = api.rsplit_once('/').map_or("", |(g, _)| g);
    if !group.contains('.') || group.ends_with(".k8s.io") {
        return None;
    }
    let kind = doc["kind"].as_str().unwrap_or_default();
    let schema = deploy("k8s/schemas").join(format!("{}.schema.json", kind.to_lowercase()));
    assert!(
        schema.exists(),
        "{kind} ({api}) is a custom resource that kubernetes-validate has no schema for: write {}",
        schema.display()
    );
    Some(schema)
}

/// The oldest Kubernetes the manifests must work on, and the newest
/// kubernetes-validate 1.37 knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

#[track_caller]
fn kubernetes_validate(validator: &Path, files: &[PathBuf]) {
    for version in KUBERNETES_VERSIONS {
        let out = run_ok(
            &format!("kubernetes-validate --strict (Kubernetes {version})"),
            Command::new(validator).args(["--strict", "--quiet", "-k", version]).args(files),
        );
        // --quiet prints only problems: a kind without a schema is a warning.
        assert!(out.trim().is_empty(), "kubernetes-validate (Kubernetes {version}) warned:\n{out}");
    }
}

#[test]
fn kubernetes_manifests_pass_the_kubernetes_schemas() {
    let (Some(validator), Some(check_jsonschema)) = (venv_tool("kubernetes-validate"), venv_tool("check-jsonschema"))
    else {
        return;
    };
    let files: Vec<PathBuf> = yaml_files_under(&deploy("k8s")).into_iter().filter(|f| !is_kustomization(f)).collect();
    let Some(docs) = yaml_docs(&files) else { return };
    let mut builtin = Vec::new();
    let mut custom = BTreeMap::<PathBuf, Vec<PathBuf>>::new();
    for (file, docs) in &docs {
        assert!(!docs.is_empty(), "{}: no documents", file.display());
        let schemas: BTreeSet<Option<PathBuf>> = docs.iter().map(crd_schema).collect();
        assert_eq!(schemas.len(), 1, "{}: keep custom resources in files of their own", file.display());
        match schemas.into_iter().next().flatten() {
            None => builtin.push(file.clone()),
            Some(schema) => custom.entry(schema).or_default().push(file.clone()),
        }
    }
    assert!(builtin.len() >= 10, "expected the base and overlay manifests, found {builtin:?}");
    kubernetes_validate(&validator, &builtin);
    // kubernetes-validate bundles no CRDs: the ServiceMonitor is checked
    // against deploy/k8s/schemas/servicemonitor.schema.json instead.
    assert!(!custom.is_empty(), "the example ServiceMonitor is missing");
    for (schema, files) in custom {
        run_ok(
            "check-jsonschema --check-metaschema",
            Command::new(&check_jsonschema).arg("--check-metaschema").arg(&schema),
        );
        run_ok(
            &format!("check-jsonschema --schemafile {}", schema.display()),
            Command::new(&check_jsonschema).arg("--schemafile").arg(&schema).args(&files),
        );
    }
}

/// The files a kustomization's lists name, relative to its directory.
fn kustomization_refs(k: &Value) -> Vec<String> {
    let mut refs = Vec::new();
    for key in ["resources", "components", "crds"] {
        refs.extend(k[key].as_array().into_iter().flatten().filter_map(|r| r.as_str().map(String::from)));
    }
    for key in ["patches", "patchesStrategicMerge"] {
        for p in k[key].as_array().into_iter().flatten() {
            match p {
                Value::String(s) => refs.push(s.clone()),
                p => refs.extend(p["path"].as_str().map(String::from)),
            }
        }
    }
    refs
}

/// Every kind/name of the objects, the rendered overlay's or (without
/// kustomize) the files'.
fn by_kind_name(objects: &[Value]) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for o in objects {
        let key = (
            o["kind"].as_str().unwrap_or_default().to_string(),
            o["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        );
        // Without kustomize the overlay's patches are separate documents:
        // keep the base object.
        out.entry(key).or_insert_with(|| o.clone());
    }
    out
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {pod}"))
}

#[track_caller]
fn assert_probe(c: &Value, probe: &str, path: &str) {
    assert_eq!(c[probe]["httpGet"]["path"], path, "{probe} of {}", c["name"]);
    assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe} of {}", c["name"]);
}

/// What the issue asks of the manifests, on the objects.
fn check_manifest_contents(objects: &BTreeMap<(String, String), Value>) {
    let get = |kind: &str, name: &str| {
        objects.get(&(kind.into(), name.into())).unwrap_or_else(|| panic!("no {kind} {name} among the manifests"))
    };
    let controller = get("Deployment", "portfleet-controller");
    assert_eq!(controller["spec"]["replicas"], 2);
    let pod = &controller["spec"]["template"]["spec"];
    let c = container(pod, "controller");
    assert_eq!(c["args"], json!(["serve"]));
    assert_probe(c, "readinessProbe", "/readyz?exclude=amqp");
    assert_probe(c, "livenessProbe", "/healthz");
    assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object(), "controller resources");
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let database_url = c["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "DATABASE_URL"))
        .expect("the controller's DATABASE_URL");
    assert_eq!(database_url["valueFrom"]["secretKeyRef"]["name"], "portfleet-database");

    let service = get("Service", "portfleet-controller");
    let ports: BTreeSet<(String, i64)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["port"].as_i64().unwrap()))
        .collect();
    assert_eq!(ports, BTreeSet::from([("grpc".into(), 50051), ("metrics".into(), 9464)]));

    let pdb = get("PodDisruptionBudget", "portfleet-controller");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], controller["spec"]["selector"]["matchLabels"]);

    let job = get("Job", "portfleet-migrate");
    assert_eq!(container(&job["spec"]["template"]["spec"], "migrate")["args"], json!(["migrate"]));

    let agent = get("DaemonSet", "portfleet-agent");
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "the agent must resolve the controller's Service");
    let a = container(pod, "agent");
    let sc = &a["securityContext"];
    assert_eq!(sc["capabilities"]["add"], json!(["NET_RAW", "NET_ADMIN"]));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_probe(a, "readinessProbe", "/readyz");
    assert_probe(a, "livenessProbe", "/healthz");
    assert!(a["resources"]["requests"].is_object() && a["resources"]["limits"].is_object(), "agent resources");
    for init in pod["initContainers"].as_array().into_iter().flatten() {
        assert_ne!(init["securityContext"]["privileged"], true, "init container {}", init["name"]);
        assert_eq!(init["securityContext"]["capabilities"]["drop"], json!(["ALL"]), "init container {}", init["name"]);
    }

    for (kind, name) in [("Service", "portfleet-controller"), ("Service", "portfleet-agent")] {
        assert_eq!(get(kind, name)["metadata"]["labels"]["portfleet.io/metrics"], "true", "{kind} {name}");
    }
    let monitor = get("ServiceMonitor", "portfleet");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["spec"]["selector"]["matchLabels"]["portfleet.io/metrics"], "true");

    for name in ["portfleet-database", "portfleet-controller-tls", "portfleet-agent-enroll"] {
        let secret = get("Secret", name);
        for (key, value) in secret["stringData"].as_object().unwrap_or_else(|| panic!("Secret {name} has stringData")) {
            assert!(value.as_str().unwrap().contains("FAKE"), "Secret {name} key {key}: example values say FAKE");
        }
    }
}

#[test]
fn kustomizations_name_existing_files_and_render() {
    let kustomizations: Vec<PathBuf> =
        yaml_files_under(&deploy("k8s")).into_iter().filter(|f| is_kustomization(f)).collect();
    assert_eq!(kustomizations.len(), 2, "a base and an example overlay: {kustomizations:?}");
    let Some(docs) = yaml_docs(&kustomizations) else { return };
    let mut listed = BTreeSet::new();
    for (file, docs) in &docs {
        let dir = file.parent().unwrap();
        let refs = kustomization_refs(&docs[0]);
        assert!(!refs.is_empty(), "{}: lists nothing", file.display());
        for r in refs {
            let path = dir.join(&r);
            let ok = path.is_file() || path.join("kustomization.yaml").is_file();
            assert!(ok, "{} names {r}, which is neither a file nor a kustomization directory", file.display());
            listed.insert(path.canonicalize().unwrap());
        }
    }
    // Nothing in the base is left out of its kustomization by mistake.
    for f in yaml_files_under(&deploy("k8s/base")).into_iter().filter(|f| !is_kustomization(f)) {
        assert!(listed.contains(&f.canonicalize().unwrap()), "{} is in no kustomization", f.display());
    }

    let overlay = deploy("k8s/overlays/example");
    let rendered = if let Some(kustomize) = find_on_path("kustomize") {
        Some(run_ok("kustomize build", Command::new(kustomize).arg("build").arg(&overlay)))
    } else if let Some(kubectl) = find_on_path("kubectl") {
        Some(run_ok("kubectl kustomize", Command::new(kubectl).arg("kustomize").arg(&overlay)))
    } else {
        // Debian packages neither kustomize nor kubectl: without them the
        // files are checked one by one (above and in
        // kubernetes_manifests_pass_the_kubernetes_schemas).
        eprintln!("note: neither kustomize nor kubectl is installed: the overlay is not rendered");
        None
    };
    let objects: Vec<Value> = match rendered {
        Some(text) => {
            let dir = tempfile::tempdir().unwrap();
            let all = dir.path().join("rendered.yaml");
            std::fs::write(&all, &text).unwrap();
            let Some(mut docs) = yaml_docs(std::slice::from_ref(&all)) else { return };
            let objects = docs.remove(&all).unwrap();
            for o in &objects {
                let meta = &o["metadata"];
                let namespace = if o["kind"] == "Namespace" { &meta["name"] } else { &meta["namespace"] };
                assert_eq!(namespace, "portfleet", "{} {}: the overlay's namespace", o["kind"], meta["name"]);
                assert_eq!(meta["labels"]["app.kubernetes.io/part-of"], "portfleet", "{} {}", o["kind"], meta["name"]);
            }
            assert!(!text.contains("image: portfleet\n"), "the overlay names the image's registry and tag:\n{text}");
            // The rendered built-in objects validate as they will be applied.
            let builtin: Vec<&Value> = objects.iter().filter(|o| crd_schema(o).is_none()).collect();
            let builtin_file = dir.path().join("builtin.yaml");
            let text: Vec<String> = builtin.iter().map(|o| o.to_string()).collect();
            std::fs::write(&builtin_file, text.join("\n---\n")).unwrap();
            if let Some(validator) = venv_tool("kubernetes-validate") {
                kubernetes_validate(&validator, &[builtin_file]);
            }
            let scope = by_kind_name(&objects);
            assert_eq!(
                scope[&("ConfigMap".into(), "portfleet-controller".into())]["data"]["PORTFLEET_ALLOW"],
                "192.0.2.0/24"
            );
            objects
        }
        None => {
            let files: Vec<PathBuf> =
                yaml_files_under(&deploy("k8s")).into_iter().filter(|f| !is_kustomization(f)).collect();
            let Some(docs) = yaml_docs(&files) else { return };
            docs.into_values().flatten().collect()
        }
    };
    check_manifest_contents(&by_kind_name(&objects));
    let mut names = BTreeSet::new();
    for f in yaml_files_under(&deploy("k8s")) {
        names.extend(env_names_in(&read(&f)));
    }
    check_env_names_exist("deploy/k8s", names);
}

/// Environment variables the deployment files set, which the binaries must
/// read: each must appear as a string in their sources.
fn check_env_names_exist(origin: &str, names: impl IntoIterator<Item = String>) {
    let sources = binaries_sources();
    let missing: Vec<String> = names.into_iter().filter(|n| !sources.contains(&format!("\"{n}\""))).collect();
    assert!(missing.is_empty(), "{origin} sets {missing:?}, which no binary reads (a renamed flag?)");
}

fn is_ours(name: &str) -> bool {
    name.starts_with("PORTFLEET_") || name == "DATABASE_URL" || name == "AMQP_URL"
}

/// `PORTFLEET_*`, `DATABASE_URL` and `AMQP_URL` names in a text.
fn env_names_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .filter(|w| is_ours(w))
        .map(String::from)
        .collect()
}

#[test]
fn compose_file_follows_the_compose_spec_and_its_comments() {
    let Some(check_jsonschema) = venv_tool("check-jsonschema") else { return };
    let compose_path = deploy("docker-compose.yml");
    run_ok(
        "check-jsonschema --builtin-schema vendor.compose-spec",
        Command::new(check_jsonschema).args(["--builtin-schema", "vendor.compose-spec"]).arg(&compose_path),
    );
    let Some(compose) = yaml_doc(&compose_path) else { return };
    let text = read(&compose_path);
    let header = &text[..text.find("\nservices:").expect("services")];
    assert!(header.contains("PORTFLEET_ALLOW"), "the top of the compose file explains PORTFLEET_ALLOW");
    let services = compose["services"].as_object().expect("services");

    for (name, s) in services {
        let one_shot = s["restart"] == "no" || s["profiles"].is_array();
        let health = &s["healthcheck"];
        if health["disable"] == true {
            assert!(one_shot, "{name}: only one-shot or tool services may go without a healthcheck");
        } else {
            assert!(health["test"].is_array(), "{name} has no healthcheck");
        }
        // Bind mounts name files that exist (relative to deploy/).
        for v in s["volumes"].as_array().into_iter().flatten() {
            let source = v.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(deploy(source).exists(), "{name} mounts {source}, which does not exist");
            }
        }
        if let Some(build) = s.get("build") {
            let context = deploy(build["context"].as_str().unwrap());
            assert!(context.join(build["dockerfile"].as_str().unwrap()).is_file(), "{name}'s Dockerfile");
        }
    }

    let agent = &services["agent"];
    assert_eq!(agent["network_mode"], "host", "the agent scans from the host's network");
    assert_eq!(agent["environment"]["PORTFLEET_CONTROLLER"], "http://127.0.0.1:50051");
    assert_eq!(agent["cap_add"], json!(["NET_RAW", "NET_ADMIN"]));
    assert_eq!(agent["cap_drop"], json!(["ALL"]));
    assert_ne!(agent["privileged"], true);
    let controller = &services["controller"];
    let ports: Vec<&str> = controller["ports"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(ports.contains(&"127.0.0.1:50051:50051"), "the agent reaches the controller on the host's port: {ports:?}");
    assert!(ports.contains(&"127.0.0.1:9464:9464"), "the controller's metrics port: {ports:?}");
    let broker: Vec<&str> =
        services["rabbitmq"]["ports"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(broker.iter().any(|p| p.ends_with(":5672:5672")), "RabbitMQ's AMQP port is published: {broker:?}");
    let token = services["admin-token"]["command"].to_string();
    assert!(token.contains("tokens create --scope admin"), "the admin-token service makes an admin token: {token}");
    for name in ["prometheus", "grafana"] {
        assert!(services.contains_key(name), "the compose file runs {name}");
    }
    check_env_names_exist(
        "deploy/docker-compose.yml",
        services
            .values()
            .flat_map(|s| s["environment"].as_object().into_iter().flatten().map(|(k, _)| k.clone()))
            .filter(|k| is_ours(k)),
    );

    // The image carries the CLI, and the build context leaves target/ out.
    let dockerfile = read(&deploy("Dockerfile"));
    assert!(dockerfile.contains("-p portfleet-cli"), "the Dockerfile builds the CLI");
    assert!(dockerfile.contains("target/release/portfleet "), "the Dockerfile copies the CLI");
    let ignore = read(&repo().join(".dockerignore"));
    for pattern in ["target/", ".git/"] {
        assert!(ignore.lines().any(|l| l.trim() == pattern), ".dockerignore leaves out {pattern}");
    }
}

/// Every source file of the binaries, concatenated.
fn binaries_sources() -> String {
    let mut sources = String::new();
    for dir in ["controller/src", "agent/src", "cli/src", "telemetry/src"] {
        let mut stack = vec![repo().join(dir)];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else { continue };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    sources.push_str(&read(&p));
                }
            }
        }
    }
    sources
}

#[test]
fn default_config_files_name_existing_flags() {
    let sources = binaries_sources();
    for file in ["config/controller.toml", "config/agent.toml"] {
        let text = read(&deploy(file));
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter_map(|l| l.trim_start().split_once(" = ").map(|(k, _)| k))
            .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            .collect();
        assert!(keys.len() >= 20, "{file}: found only {keys:?}");
        // A long flag is `long = "key"` or, with a bare `long`, the field's
        // name.
        let missing: Vec<&&str> = keys
            .iter()
            .filter(|k| {
                !sources.contains(&format!("long = \"{k}\""))
                    && !sources.contains(&format!("pub {}:", k.replace('-', "_")))
            })
            .collect();
        assert!(missing.is_empty(), "{file} has keys no flag has: {missing:?}");
        check_env_names_exist(file, env_names_in(&text));
    }
}

/// `[Service]` settings of a unit file, `key -> values` in order.
fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::<String, Vec<String>>::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
        } else if section == "[Service]"
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            out.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    out
}

#[test]
fn systemd_units_pass_systemd_analyze() {
    let units = ["portfleet-controller.service", "portfleet-agent.service"];
    for unit in units {
        let text = read(&deploy("systemd").join(unit));
        check_env_names_exist(unit, env_names_in(&text));
        let s = unit_settings(&text);
        let one = |k: &str| s.get(k).and_then(|v| v.last()).map(String::as_str);
        assert_eq!(one("User"), Some("portfleet"), "{unit}");
        for (k, v) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectKernelLogs", "yes"),
            ("ProtectControlGroups", "yes"),
            ("SystemCallArchitectures", "native"),
            ("StateDirectory", "portfleet"),
            ("ConfigurationDirectory", "portfleet"),
        ] {
            assert_eq!(one(k), Some(v), "{unit}: {k}");
        }
        let exec = one("ExecStart").unwrap_or_else(|| panic!("{unit}: ExecStart"));
        assert!(exec.starts_with("/usr/bin/portfleet-"), "{unit}: ExecStart is where the .deb installs: {exec}");
        let env_file = one("EnvironmentFile").unwrap_or_else(|| panic!("{unit}: EnvironmentFile"));
        let example = env_file.trim_start_matches('-').trim_start_matches("/etc/portfleet/").to_string() + ".example";
        let example = deploy("systemd").join(example);
        check_env_names_exist(&example.display().to_string(), env_names_in(&read(&example)));
    }
    let agent = unit_settings(&read(&deploy("systemd/portfleet-agent.service")));
    assert_eq!(agent["CapabilityBoundingSet"], ["CAP_NET_RAW CAP_NET_ADMIN"]);
    assert_eq!(agent["AmbientCapabilities"], ["CAP_NET_RAW CAP_NET_ADMIN"]);
    let families: BTreeSet<&str> = agent["RestrictAddressFamilies"][0].split_whitespace().collect();
    assert_eq!(families, BTreeSet::from(["AF_PACKET", "AF_NETLINK", "AF_INET", "AF_INET6", "AF_UNIX"]));
    let controller = unit_settings(&read(&deploy("systemd/portfleet-controller.service")));
    assert_eq!(controller["CapabilityBoundingSet"], [""], "the controller has no capabilities");
    assert_eq!(controller["AmbientCapabilities"], [""]);

    let Some(analyze) = system_tool("systemd-analyze", "systemd") else { return };
    // A root with what verify resolves: the units, the binaries at their
    // ExecStart paths (stubs: verify only checks they are executable) and
    // the system's own units (sysinit.target and the like).
    let root = tempfile::tempdir().unwrap();
    let units_dir = root.path().join("etc/systemd/system");
    let bin = root.path().join("usr/bin");
    let system = root.path().join("usr/lib/systemd/system");
    for d in [&units_dir, &bin, &system] {
        std::fs::create_dir_all(d).unwrap();
    }
    for unit in units {
        std::fs::copy(deploy("systemd").join(unit), units_dir.join(unit)).unwrap();
    }
    for b in ["portfleet-controller", "portfleet-agent"] {
        std::fs::write(bin.join(b), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(bin.join(b), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    for host in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
        if Path::new(host).join("sysinit.target").exists() {
            run_ok(
                "copy the system units",
                Command::new("cp").args(["-a", &format!("{host}/."), system.to_str().unwrap()]),
            );
            break;
        }
    }
    let installed: Vec<String> = units.iter().map(|u| format!("/etc/systemd/system/{u}")).collect();
    let out = Command::new(&analyze)
        .args(["verify", "--man=no", "--generators=no"])
        .arg(format!("--root={}", root.path().display()))
        .args(&installed)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify reports unknown keys and bad values as warnings, still
    // exiting 0: any output at all is a failure.
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify ({}):\n{stderr}", out.status);
    // The hardening cannot quietly regress: exposure at most 2.5 of 10
    // (the controller is 1.4, the agent with its capabilities 1.9).
    for unit in &installed {
        run_ok(
            &format!("systemd-analyze security {unit}"),
            Command::new(&analyze)
                .args(["security", "--offline=yes", "--threshold=25", "--no-pager"])
                .arg(format!("--root={}", root.path().display()))
                .arg(unit),
        );
    }
}

/// Every `portfleet_*` name in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("portfleet_") {
        let before = rest[..i].chars().last();
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(name.clone());
        }
        rest = &rest[i + name.len()..];
    }
    out
}

/// docs/operations.md's metrics and their types, from its tables.
fn documented_metrics() -> BTreeMap<String, String> {
    let doc = read(&repo().join("docs/operations.md"));
    let mut out = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `portfleet_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let kind = cells.get(2).copied().unwrap_or_default().to_string();
        for name in metric_names(cells[1]) {
            out.insert(name, kind.clone());
        }
    }
    assert!(out.len() >= 30, "docs/operations.md's metric tables: found only {out:?}");
    out
}

/// The names that are neither documented nor a documented histogram's
/// `_bucket`, `_sum` or `_count` series.
fn undocumented<'a>(names: &'a BTreeSet<String>, documented: &BTreeMap<String, String>) -> Vec<&'a String> {
    names
        .iter()
        .filter(|n| {
            if documented.contains_key(*n) {
                return false;
            }
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| n.strip_suffix(s));
            let documented_histogram = base.is_some_and(|b| documented.get(b).is_some_and(|k| k == "histogram"));
            !documented_histogram
        })
        .collect()
}

#[test]
fn alerts_and_dashboard_use_only_documented_metrics() {
    let documented = documented_metrics();
    let mut problems = Vec::new();
    for file in ["prometheus/alerts.yml", "prometheus/alerts_test.yml", "grafana/portfleet-fleet.json"] {
        let names = metric_names(&read(&deploy(file)));
        assert!(names.len() >= 5, "{file}: found only {names:?}");
        problems.extend(undocumented(&names, &documented).into_iter().map(|n| format!("{file}: {n}")));
    }
    assert!(problems.is_empty(), "metrics docs/operations.md does not document (renamed?):\n{}", problems.join("\n"));
}

#[test]
fn alert_rules_pass_promtool_and_every_alert_fires_in_a_test() {
    let Some(promtool) = system_tool("promtool", "prometheus") else { return };
    let dir = deploy("prometheus");
    run_ok("promtool check rules", Command::new(&promtool).args(["check", "rules", "alerts.yml"]).current_dir(&dir));
    run_ok("promtool test rules", Command::new(&promtool).args(["test", "rules", "alerts_test.yml"]).current_dir(&dir));
    run_ok(
        "promtool check config",
        Command::new(&promtool).args(["check", "config", "prometheus.yml"]).current_dir(&dir),
    );

    let (Some(rules), Some(tests), Some(config)) = (
        yaml_doc(&dir.join("alerts.yml")),
        yaml_doc(&dir.join("alerts_test.yml")),
        yaml_doc(&dir.join("prometheus.yml")),
    ) else {
        return;
    };
    let alerts: BTreeSet<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect();
    for wanted in [
        "PortfleetNoAgentsConnected",
        "PortfleetScansWithoutCapableAgent",
        "PortfleetLeaseExpiryStorm",
        "PortfleetIngestLag",
        "PortfleetDeadLetterGrowth",
        "PortfleetAgentKernelDrops",
    ] {
        assert!(alerts.contains(wanted), "alerts.yml has no {wanted}");
    }
    let fired: BTreeSet<String> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .filter_map(|c| c["alertname"].as_str().map(String::from))
        .collect();
    let never: Vec<&String> = alerts.difference(&fired).collect();
    assert!(never.is_empty(), "alerts_test.yml never fires {never:?}");
    // The jobs the rules name are the example scrape config's (and the
    // Kubernetes Services' names, which the ServiceMonitor makes the jobs).
    let jobs: BTreeSet<&str> =
        config["scrape_configs"].as_array().unwrap().iter().filter_map(|s| s["job_name"].as_str()).collect();
    let text = read(&dir.join("alerts.yml"));
    for part in text.split("job=\"").skip(1) {
        let job = part.split('"').next().unwrap();
        assert!(jobs.contains(job), "alerts.yml names job {job}, which prometheus.yml does not scrape");
    }
}

/// Every panel's queries, rows' nested panels included.
fn panel_queries(panels: &[Value], out: &mut Vec<(String, String)>) {
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                title.clone(),
                t["expr"].as_str().unwrap_or_else(|| panic!("panel {title}: a target without expr")).to_string(),
            ));
        }
        if let Some(nested) = p["panels"].as_array() {
            panel_queries(nested, out);
        }
    }
}

#[test]
fn dashboard_queries_parse_and_use_its_variables() {
    let path = deploy("grafana/portfleet-fleet.json");
    let dash: Value = serde_json::from_str(&read(&path)).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "portfleet-fleet");
    let vars: BTreeMap<String, &Value> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v))
        .collect();
    // The provisioned datasource (deploy/grafana/provisioning) is the
    // datasource variable's default.
    let Some(provisioned) = yaml_doc(&deploy("grafana/provisioning/datasources/prometheus.yml")) else { return };
    assert_eq!(vars["datasource"]["current"]["value"], provisioned["datasources"][0]["uid"]);

    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut stack: Vec<&Value> = panels.iter().collect();
    while let Some(p) = stack.pop() {
        assert!(ids.insert(p["id"].as_i64().unwrap()), "panel id {} twice", p["id"]);
        assert!(p["gridPos"]["w"].is_i64(), "panel {} has no gridPos", p["title"]);
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {}", p["title"]);
        }
        stack.extend(p["panels"].as_array().into_iter().flatten());
    }

    let mut queries = Vec::new();
    panel_queries(panels, &mut queries);
    assert!(queries.len() >= 30, "the dashboard has {} queries", queries.len());
    // As recording rules, promtool parses every query (Grafana's own
    // variables filled in first; any other `$` is an undefined variable).
    let mut rules = Vec::new();
    for (i, (title, expr)) in queries.iter().enumerate() {
        let mut e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m");
        for (name, v) in &vars {
            e = e.replace(&format!("${name}"), v["current"]["value"].as_str().unwrap());
        }
        assert!(!e.contains('$'), "panel {title}: {expr} uses an undefined variable");
        rules.push(json!({"record": format!("dashboard:query_{i}"), "expr": e}));
    }
    let Some(promtool) = system_tool("promtool", "prometheus") else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string()).unwrap();
    run_ok(
        "promtool check rules (the dashboard's queries)",
        Command::new(promtool).args(["check", "rules"]).arg(&file),
    );
}

#[test]
fn debian_package_metadata_names_existing_files() {
    let out = run_ok(
        "cargo metadata",
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["metadata", "--no-deps", "--offline", "--format-version", "1"])
            .current_dir(repo()),
    );
    let meta: Value = serde_json::from_str(&out).unwrap();
    let mut packaged = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let Some(deb) = p["metadata"]["deb"].as_object() else { continue };
        let name = p["name"].as_str().unwrap();
        let dir = Path::new(p["manifest_path"].as_str().unwrap()).parent().unwrap().to_path_buf();
        let mut dests = Vec::new();
        for a in deb["assets"].as_array().unwrap_or_else(|| panic!("{name}: assets")) {
            let (src, dest) = (a[0].as_str().unwrap(), a[1].as_str().unwrap());
            if !src.starts_with("target/release/") {
                assert!(dir.join(src).is_file(), "{name}'s .deb asset {src} does not exist");
            }
            dests.push(dest.to_string());
        }
        if let Some(scripts) = deb.get("maintainer-scripts").and_then(Value::as_str) {
            let scripts = dir.join(scripts);
            for s in ["postinst", "prerm", "postrm"] {
                let script = scripts.join(s);
                let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&script).unwrap().permissions());
                assert!(mode & 0o111 != 0, "{} is not executable", script.display());
                run_ok(&format!("sh -n {}", script.display()), Command::new("sh").arg("-n").arg(&script));
            }
            let postinst = read(&scripts.join("postinst"));
            assert!(postinst.contains("useradd --system"), "{name}'s postinst makes the portfleet user");
        }
        packaged.insert(name.to_string(), dests);
    }
    let names: BTreeSet<&str> = packaged.keys().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["portfleet-agent", "portfleet-cli", "portfleet-controller"]));
    for (name, unit, config) in [
        ("portfleet-controller", "portfleet-controller.service", "etc/portfleet/controller.toml"),
        ("portfleet-agent", "portfleet-agent.service", "etc/portfleet/agent.toml"),
    ] {
        assert!(packaged[name].contains(&"lib/systemd/system/".to_string()), "{name} ships {unit}");
        assert!(packaged[name].contains(&config.to_string()), "{name} ships /{config}");
    }
    let agent_postinst = read(&deploy("debian/agent/postinst"));
    assert!(
        agent_postinst.contains("setcap cap_net_raw,cap_net_admin+ep"),
        "the agent's postinst sets its capabilities"
    );
    run_ok("bash -n scripts/build-debs.sh", Command::new("bash").arg("-n").arg(repo().join("scripts/build-debs.sh")));
}
