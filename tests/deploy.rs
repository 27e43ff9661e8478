//! The deployment files are checked, not just written: `deploy/k8s/`
//! validates offline against the Kubernetes schemas (kubernetes-validate)
//! and `deploy/compose.yaml` against the vendored Compose Specification
//! schema (check-jsonschema), both installed by `scripts/test.sh`; every
//! setting they pass to `switchyard` is one the binary takes; the compose
//! replicas, load balancer and broker name the same addresses; and a
//! replica run with the compose settings reaches a PostgreSQL that asks
//! for a password and passes the compose healthcheck.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use switchyard_tests::pg_cluster::Cluster;
use switchyard_tests::{Api, Server, TOKEN, switchyard};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A tool of the `target/pytools` virtual environment
/// (scripts/ensure-python-tools.sh), or where `env` says it is.
fn python_tool(env: &str, name: &str) -> PathBuf {
    let tool = std::env::var(env).map(PathBuf::from).unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/pytools/bin")
            .join(name)
    });
    assert!(
        tool.exists(),
        "{} is missing: scripts/test.sh installs it (scripts/ensure-python-tools.sh)",
        tool.display()
    );
    tool
}

/// `switchyard ARGS --help`.
fn help(args: &[&str]) -> String {
    let out = Command::new(switchyard_tests::bin())
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "switchyard {args:?} --help");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy().join("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_kubernetes_manifests_validate_offline() {
    let tool = python_tool("SWITCHYARD_KUBERNETES_VALIDATE", "kubernetes-validate");
    let files = manifests();
    let kinds = ["Deployment", "Service", "PodDisruptionBudget", "Job"];
    for kind in kinds {
        assert!(
            files.iter().any(|f| std::fs::read_to_string(f)
                .unwrap()
                .contains(&format!("kind: {kind}\n"))),
            "deploy/k8s has a {kind}"
        );
    }
    let out = Command::new(&tool)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert_eq!(
        report.matches(" passed for resource ").count(),
        files.len(),
        "{report}"
    );
}

/// The environment variables and arguments the manifests give the
/// container are ones `switchyard serve` / `db migrate` document.
#[test]
fn the_manifests_use_only_settings_the_binary_takes() {
    let serve = help(&["serve"]);
    let migrate = help(&["db", "migrate"]);
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        let takes = if text.contains("\"migrate\"") {
            &migrate
        } else {
            &serve
        };
        for line in text.lines() {
            let Some(name) = line.trim().strip_prefix("- name: ") else {
                continue;
            };
            // SWITCHYARD_LOG is the log filter, read before any command.
            let is_setting = (name.starts_with("SWITCHYARD_") && name != "SWITCHYARD_LOG")
                || name == "DATABASE_URL";
            if is_setting {
                assert!(
                    takes.contains(&format!("[env: {name}")),
                    "{} sets {name}, which the command does not read",
                    file.display()
                );
            }
        }
    }
    assert!(serve.contains("--listen"), "{serve}");
}

/// `deploy/compose.yaml` as Compose reads it (anchors and merge keys
/// resolved), turned into JSON by the YAML loader check-jsonschema
/// installs with itself (ruamel.yaml).
fn compose() -> Value {
    let tool = python_tool("SWITCHYARD_CHECK_JSONSCHEMA", "check-jsonschema");
    let out = Command::new(tool.with_file_name("python"))
        .arg("-c")
        .arg(
            "import json, sys\n\
             from ruamel.yaml import YAML\n\
             with open(sys.argv[1]) as f:\n\
             \x20   json.dump(YAML(typ='safe', pure=True).load(f), sys.stdout)",
        )
        .arg(deploy().join("compose.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("a list: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// The services that run the switchyard image, by name.
fn switchyard_services(compose: &Value) -> BTreeMap<&str, &Value> {
    compose["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| s["image"].as_str().unwrap().starts_with("switchyard:"))
        .map(|(name, s)| (name.as_str(), s))
        .collect()
}

/// A service's `--flag value` from its command.
fn flag<'a>(service: &'a Value, name: &str) -> &'a str {
    let command = strings(&service["command"]);
    let at = command
        .iter()
        .position(|a| *a == name)
        .unwrap_or_else(|| panic!("{command:?} has {name}"));
    command[at + 1]
}

#[test]
fn the_compose_file_validates_offline_against_the_compose_specification() {
    let tool = python_tool("SWITCHYARD_CHECK_JSONSCHEMA", "check-jsonschema");
    let out = Command::new(&tool)
        .arg("--schemafile")
        .arg(deploy().join("schema/compose-spec.json"))
        .arg(deploy().join("compose.yaml"))
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert!(report.contains("ok -- validation done"), "{report}");
    let compose = compose();
    for service in [
        "postgres", "migrate", "hub-1", "hub-2", "hub-3", "lb", "broker",
    ] {
        assert!(
            compose["services"][service].is_object(),
            "deploy/compose.yaml has the service {service}"
        );
    }
}

/// Each switchyard service runs one of the binary's commands with options
/// and environment variables that command reads; a file a setting names is
/// a secret the service mounts; no password is written in the file.
#[test]
fn the_compose_services_use_only_settings_the_binary_takes() {
    let compose = compose();
    let deployment = std::fs::read_to_string(deploy().join("k8s/deployment.yaml")).unwrap();
    let k8s_image = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .unwrap();
    let mut commands = BTreeSet::new();
    for (name, service) in switchyard_services(&compose) {
        assert_eq!(
            service["image"], k8s_image,
            "{name} runs the image deploy/k8s names"
        );
        let command = strings(&service["command"]);
        let words = if command[0] == "db" { 2 } else { 1 };
        let takes = help(&command[..words]);
        for arg in command[words..].iter().filter(|a| a.starts_with("--")) {
            assert!(
                takes.contains(&format!("{arg} ")),
                "{name} passes {arg}, which `switchyard {}` does not take",
                command[..words].join(" ")
            );
        }
        let secrets = strings(&service["secrets"]);
        let env = service["environment"].as_object().unwrap();
        for (key, value) in env {
            let value = value.as_str().unwrap();
            match key.as_str() {
                // The log filter, read before any command.
                "SWITCHYARD_LOG" => {}
                // The PostgreSQL driver's password file (the libpq
                // convention), read when DATABASE_URL has no password.
                "PGPASSFILE" => assert!(
                    env["DATABASE_URL"]
                        .as_str()
                        .is_some_and(|u| u.starts_with("postgres://")),
                    "{name} sets PGPASSFILE without a PostgreSQL DATABASE_URL"
                ),
                _ => assert!(
                    takes.contains(&format!("[env: {key}")),
                    "{name} sets {key}, which `switchyard {}` does not read",
                    command[..words].join(" ")
                ),
            }
            if let Some(secret) = value.strip_prefix("/run/secrets/") {
                assert!(
                    secrets.contains(&secret),
                    "{name}: {key} names the secret {secret}, which it does not mount"
                );
                assert!(
                    compose["secrets"][secret]["file"].is_string(),
                    "the secret {secret} is defined"
                );
            }
            if key == "DATABASE_URL" {
                let url = url::Url::parse(value).unwrap();
                assert_eq!(url.password(), None, "{name}: no password in {value}");
            }
        }
        commands.insert(command[..words].join(" "));
    }
    let want: BTreeSet<String> = ["serve", "db migrate", "broker"].map(String::from).into();
    assert_eq!(commands, want);
    assert!(
        compose["services"]["postgres"]["environment"]
            .get("POSTGRES_PASSWORD")
            .is_none(),
        "the database password comes from a secret file"
    );
}

/// The load balancer's backends are the three replicas, each advertising
/// the address the balancer uses; the broker reaches the hub through the
/// balancer; replicas start after the migration succeeded, which starts
/// after PostgreSQL is healthy; every service holding sockets has the
/// descriptor limit.
#[test]
fn the_compose_replicas_the_balancer_and_the_broker_agree() {
    let compose = compose();
    let services = &compose["services"];
    let mut replicas = BTreeSet::new();
    for (name, hub) in switchyard_services(&compose) {
        if strings(&hub["command"])[0] != "serve" {
            continue;
        }
        let port = flag(hub, "--listen").strip_prefix("0.0.0.0:").unwrap();
        let address = format!("{name}:{port}");
        assert_eq!(
            hub["environment"]["SWITCHYARD_ADVERTISE"],
            format!("http://{address}")
        );
        let check = strings(&hub["healthcheck"]["test"]).join(" ");
        assert!(
            check.contains(&format!("/dev/tcp/127.0.0.1/{port} ")) && check.contains("/readyz"),
            "{name} is healthy when /readyz answers: {check}"
        );
        assert_eq!(
            hub["depends_on"]["migrate"]["condition"],
            "service_completed_successfully"
        );
        replicas.insert(address);
    }
    assert_eq!(replicas.len(), 3, "three replicas: {replicas:?}");
    assert_eq!(strings(&services["migrate"]["command"]), ["db", "migrate"]);
    assert_eq!(
        services["migrate"]["depends_on"]["postgres"]["condition"],
        "service_healthy"
    );
    assert!(services["postgres"]["healthcheck"]["test"].is_array());

    let lb = &services["lb"];
    assert!(
        strings(&lb["volumes"]).contains(&"./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"),
        "the balancer runs deploy/haproxy.cfg"
    );
    let config = std::fs::read_to_string(deploy().join("haproxy.cfg")).unwrap();
    let backends: BTreeSet<String> = config
        .lines()
        .filter(|l| l.trim().starts_with("server "))
        .map(|l| {
            let var = l.split("\"${").nth(1).unwrap().split('}').next().unwrap();
            lb["environment"][var]
                .as_str()
                .unwrap_or_else(|| panic!("lb sets {var}"))
                .to_owned()
        })
        .collect();
    assert_eq!(
        backends, replicas,
        "the balancer's servers are the replicas"
    );
    let lb_port = lb["environment"]["SWITCHYARD_LB_BIND"]
        .as_str()
        .unwrap()
        .strip_prefix(':')
        .unwrap();
    assert!(strings(&lb["ports"]).contains(&format!("{lb_port}:{lb_port}").as_str()));
    assert_eq!(
        flag(&services["broker"], "--hub"),
        format!("http://lb:{lb_port}")
    );

    for (name, service) in services.as_object().unwrap() {
        if name == "postgres" || name == "migrate" {
            continue;
        }
        let nofile = &service["ulimits"]["nofile"];
        assert!(
            nofile["soft"].as_u64().unwrap() >= 65_536 && nofile["soft"] == nofile["hard"],
            "{name} may hold 65,536 descriptors: {nofile}"
        );
    }
}

fn haproxy() -> PathBuf {
    ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("haproxy is installed (scripts/test.sh installs it with apt-get)")
}

/// HAProxy accepts deploy/haproxy.cfg with the balancer's environment from
/// compose, although the replica names do not resolve here (nor, inside
/// Compose, before the replicas exist): with SWITCHYARD_LB_DNS those
/// servers start down and are looked up again; without it HAProxy refuses.
#[test]
fn haproxy_takes_its_config_with_the_compose_environment() {
    let compose = compose();
    let env = compose["services"]["lb"]["environment"]
        .as_object()
        .unwrap();
    let check = |without: Option<&str>| {
        let mut cmd = Command::new(haproxy());
        cmd.arg("-c").arg("-f").arg(deploy().join("haproxy.cfg"));
        for (key, value) in env {
            if Some(key.as_str()) != without {
                cmd.env(key, value.as_str().unwrap());
            }
        }
        let out = cmd.output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), report)
    };
    let (valid, report) = check(None);
    assert!(valid, "{report}");
    assert!(report.contains("Configuration file is valid"), "{report}");
    let (valid, report) = check(Some("SWITCHYARD_LB_DNS"));
    assert!(
        !valid,
        "unresolvable names stop HAProxy without it: {report}"
    );
}

/// `migrate` and a replica run with the compose settings (their command,
/// environment and secret files; only the PostgreSQL host, the listen
/// address and the /run/secrets directory are local ones) reach a
/// PostgreSQL that asks for a password, which they read from PGPASSFILE;
/// the admin token comes from its file; the replica passes the compose
/// healthcheck, which fails once it is gone. A wrong password stops
/// `migrate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_the_compose_settings_reaches_a_password_protected_postgres() {
    const PASSWORD: &str = "compose-test-password-0123";
    let compose = compose();
    let services = &compose["services"];
    let pg = Cluster::start_with_password("switchyard", PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("admin-token"), format!("{TOKEN}\n")).unwrap();
    // Owned by the user switchyard runs as and readable by no one else, as
    // deploy/compose.yaml says to make it: the driver ignores it otherwise.
    let pgpass = |password: &str| {
        let line = format!("127.0.0.1:{}:switchyard:switchyard:{password}\n", pg.port());
        let file = secrets.join("pgpass");
        std::fs::write(&file, line).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
    };
    // The service's command and environment, with compose's host names and
    // secret directory replaced by local ones.
    let command = |service: &Value| {
        let mut cmd = switchyard(dir.path());
        for (key, value) in service["environment"].as_object().unwrap() {
            let value = value
                .as_str()
                .unwrap()
                .replace("@postgres:5432/", &format!("@127.0.0.1:{}/", pg.port()))
                .replace("/run/secrets/", &format!("{}/", secrets.display()));
            cmd.env(key, value);
        }
        for arg in strings(&service["command"]) {
            cmd.arg(if arg == "0.0.0.0:7700" {
                "127.0.0.1:0"
            } else {
                arg
            });
        }
        cmd
    };

    pgpass("not-the-password");
    let out = command(&services["migrate"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error:"), "{stderr}");

    pgpass(PASSWORD);
    let out = command(&services["migrate"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let hub = &services["hub-1"];
    let server = Server::run(command(hub));
    assert!(
        server
            .wait_for("/readyz", 200, Duration::from_secs(10))
            .await,
        "ready: the database answers and the command bus listens"
    );
    let (code, body) = Api::new(&server.base, TOKEN)
        .call("GET", "/v1/cluster", None)
        .await;
    assert_eq!(code, 200, "the admin token file is read: {body}");

    let port = server.base.rsplit(':').next().unwrap().to_owned();
    let healthcheck = || {
        let test = strings(&hub["healthcheck"]["test"]);
        assert_eq!(test[0], "CMD");
        Command::new(test[1])
            .args(
                test[2..]
                    .iter()
                    .map(|a| a.replace("/7700", &format!("/{port}"))),
            )
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(
        healthcheck(),
        "the compose healthcheck passes a ready replica"
    );
    server.kill9();
    assert!(!healthcheck(), "and fails once it is gone");
}
