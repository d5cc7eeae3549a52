//! The `aos-cm` command line.

use anyhow::Context;
use aos_cm::api::cloud::{desired, unitconfig};
use aos_cm::api::json::{self, Problems};
use aos_cm::config::{self, Config};
use aos_cm::reconcilers;
use aos_cm::render;
use aos_cm::scenario::{self, ScenarioError};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "aos-cm",
    version,
    about = "Communication Manager for AosEdge units: a declarative reconciler",
    long_about = "aos-cm is the Communication Manager of an AosEdge unit: it takes the desired \
state from AosCloud, compares it with what the nodes report, and plans and carries out the \
actions that converge the unit. `plan` shows those actions without doing anything."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the actions that would converge a unit, without doing anything (dry run).
    ///
    /// SCENARIO is a folder with desired.json (a v7 desiredStatus frame), nodes.json (IAM
    /// nodeInfo + SM smInfo per node), and optionally unitconfig.json, blobs/ and observed.json.
    /// Exit status: 0 when planned, 2 when the input is invalid, 1 on other errors.
    Plan {
        /// Scenario folder, e.g. examples/desired-states/fresh-install
        #[arg(required_unless_present = "store")]
        scenario: Option<PathBuf>,
        /// Plan against a daemon's store instead: its working directory (holding cm.redb) or
        /// the store file itself
        #[arg(long, conflicts_with = "scenario")]
        store: Option<PathBuf>,
        /// Print the plan as JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Run the CM against a simulated cloud and simulated nodes; watch the unit converge.
    ///
    /// The daemon runs in this process as `aos-cm run` starts it (SM server, store,
    /// reconcilers, cloud link, blob pipeline, update scheduler). A simulated IAM gives it the
    /// unit's identity and nodes; a simulated AosCloud (service discovery and a v7 WebSocket)
    /// sends the desired state and serves the blobs; the nodes' Service Managers are simulated
    /// and connect over loopback gRPC. The unit is the bundled example (3 nodes, 5 items) unless
    /// --nodes asks for a synthetic one (its desired state goes into the store). Exit status 0
    /// once converged (and, with --churn, every period converged); 1 with the open conditions
    /// if it does not converge in time.
    Demo {
        /// Run a synthetic unit of this many nodes instead of the bundled example
        #[arg(long)]
        nodes: Option<usize>,
        /// Instances of the synthetic unit (with --nodes)
        #[arg(long, default_value_t = 256, requires = "nodes")]
        instances: usize,
        /// Address of the SM server (loopback only), e.g. 127.0.0.1:8093
        #[arg(long)]
        sm_listen: Option<std::net::SocketAddr>,
        /// Leave this node to an SM that connects from outside (repeatable)
        #[arg(long)]
        external: Vec<String>,
        /// Give up after this many seconds
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Keep the store in this directory afterwards (for `aos-cm status --store DIR`)
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// After converging, send a new desired state every SECS seconds (four variants in
        /// turn), drop the cloud connection every sixth period and reconnect an SM every
        /// sixth; exit status 1 if a period does not converge within it (bundled example only)
        #[arg(long, value_name = "SECS", conflicts_with = "nodes")]
        churn: Option<u64>,
        /// How long the churn goes on, in seconds
        #[arg(long, value_name = "SECS", default_value_t = 3600, requires = "churn")]
        run_for: u64,
    },
    /// Run the Communication Manager daemon (the main-node service).
    ///
    /// Reads aos_cm.cfg, opens the store in workingDir, serves the SMs on cmServerUrl and the
    /// item blobs on fileServerUrl, runs the embedded DNS server on dnsIp (when set), and
    /// connects to AosCloud through service discovery. The system ID, this node and the
    /// certificates come from IAM (iamPublicServerUrl, iamProtectedServerUrl), or from the
    /// config's `identity` section on a unit without IAM (see aos_cm.static.cfg.sample). Tells
    /// systemd when ready (NOTIFY_SOCKET).
    /// SIGTERM or Ctrl-C: stops cleanly (exit 0). SIGHUP: re-reads the config and applies
    /// unitStatusSendTimeout, alerts.sendPeriod, monitoring.sendPeriod and
    /// imageManager.updateItemTtl at once; other changes are logged and take effect at the
    /// next start (an invalid config is logged and ignored). Logs go to stderr (RUST_LOG sets the level; default
    /// info).
    Run {
        /// The daemon config
        #[arg(short = 'c', long = "config", default_value = "/etc/aos/aos_cm.cfg")]
        config: PathBuf,
        /// Log format on stderr
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
    },
    /// Show what a daemon's store says: nodes, items, instances, networks and open conditions.
    ///
    /// Reads the store of a running or stopped daemon: --store names its working directory
    /// (holding cm.redb) or the file; -c reads workingDir from an aos_cm.cfg.
    Status {
        /// The daemon config, for its workingDir
        #[arg(short = 'c', long = "config", conflicts_with = "store")]
        config: Option<PathBuf>,
        /// The store: a working directory holding cm.redb, or the file
        #[arg(long)]
        store: Option<PathBuf>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Validate a v7 cloud frame, a unit config or an aos_cm.cfg file.
    ///
    /// The kind is told from the content unless --kind says it. Exit status: 0 when valid, 2
    /// with the JSON path of every error when not.
    Validate {
        file: PathBuf,
        #[arg(long, value_enum)]
        kind: Option<Kind>,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Kind {
    /// A protocol v7 frame: {header, data}
    Frame,
    /// A unit config: {formatVersion, version, nodes}
    Unitconfig,
    /// The daemon config aos_cm.cfg
    Config,
}

const EXIT_INVALID: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (default_level, json_logs) = match &cli.command {
        Command::Run { log_format, .. } => ("info", *log_format == LogFormat::Json),
        // The demo prints its own progress; the simulated nodes going away at the end is noise.
        Command::Demo { .. } => ("error", false),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    if json_logs {
        tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    }
    let result = match cli.command {
        Command::Run { config, .. } => run(&config),
        Command::Demo {
            nodes,
            instances,
            sm_listen,
            external,
            timeout,
            workdir,
            churn,
            run_for,
        } => demo(aos_cm::demo::DemoOptions {
            nodes,
            instances,
            sm_listen,
            external,
            timeout: std::time::Duration::from_secs(timeout),
            workdir,
            churn: churn.map(|every| aos_cm::demo::Churn {
                every: std::time::Duration::from_secs(every.max(1)),
                run_for: std::time::Duration::from_secs(run_for),
            }),
        }),
        Command::Plan {
            scenario,
            store,
            json,
        } => match (scenario, store) {
            (_, Some(store)) => plan_store(&store, json),
            (Some(scenario), None) => plan(&scenario, json),
            (None, None) => Err(anyhow::anyhow!("give a scenario folder or --store")),
        },
        Command::Validate { file, kind } => validate(&file, kind),
        Command::Status {
            config,
            store,
            json,
        } => status(config, store, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aos-cm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn plan(dir: &std::path::Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let sc = match scenario::load(dir) {
        Ok(sc) => sc,
        Err(e @ (ScenarioError::Invalid { .. } | ScenarioError::Missing(_))) => {
            eprintln!("aos-cm: invalid scenario: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        Err(e) => return Err(e.into()),
    };
    let plans = reconcilers::plan_all(&sc.snapshot, sc.now);
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&render::plan_json(&plans))?
        );
    } else {
        print!("{}", render::plan_text(&plans));
    }
    Ok(ExitCode::SUCCESS)
}

fn run(config_path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = match aos_cm::config::Config::load(config_path) {
        Ok((config, warnings)) => {
            for w in warnings {
                tracing::warn!("{w}");
            }
            config
        }
        Err(e) => {
            eprintln!("aos-cm: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    let runtime = aos_cm::runtime::build().context("starting the async runtime")?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let daemon = aos_cm::daemon::Daemon::start(
            &config,
            aos_cm::reconcilers::runner::RunnerConfig::default(),
        )
        .await?;
        // One line on stdout for whoever started us (and the system tests).
        println!("aos-cm: running; SM server on {}", daemon.sm_addr);
        tracing::info!("SM server on {}", daemon.sm_addr);
        aos_cm::daemon::sd_notify("READY=1");
        let mut running = config.clone();
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = hup.recv() => match aos_cm::config::Config::load(config_path) {
                    Ok((new, warnings)) => {
                        for w in warnings {
                            tracing::warn!("{w}");
                        }
                        if new == running {
                            tracing::info!("SIGHUP: config unchanged");
                        } else {
                            match daemon.reload(&running, &new) {
                                Ok(r) => {
                                    if !r.applied.is_empty() {
                                        tracing::info!("SIGHUP: now in use: {}", r.applied.join(", "));
                                    }
                                    if r.restart_needed {
                                        tracing::warn!(
                                            "SIGHUP: other settings in {} changed; they take effect at the next start",
                                            config_path.display()
                                        );
                                    }
                                    running = aos_cm::daemon::reloadable_part(&running, &new);
                                }
                                Err(e) => tracing::error!("SIGHUP: {e}"),
                            }
                        }
                    }
                    Err(e) => tracing::error!("SIGHUP: the config is not valid, keeping the running one: {e}"),
                },
            }
        }
        tracing::info!("stopping");
        aos_cm::daemon::sd_notify("STOPPING=1");
        if !daemon.shutdown(std::time::Duration::from_secs(4)).await {
            tracing::warn!("some tasks did not stop within 4 s");
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn demo(opts: aos_cm::demo::DemoOptions) -> anyhow::Result<ExitCode> {
    let runtime = aos_cm::runtime::build().context("starting the async runtime")?;
    let mut out = std::io::stdout();
    match runtime.block_on(aos_cm::demo::run(opts, &mut out)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("aos-cm demo: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn status(
    config: Option<PathBuf>,
    store: Option<PathBuf>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let path = match (config, store) {
        (_, Some(s)) => s,
        (Some(c), None) => {
            let (cfg, _) = Config::load(&c).map_err(|e| anyhow::anyhow!("{e}"))?;
            cfg.store_path()
        }
        (None, None) => {
            anyhow::bail!("give --store DIR or -c aos_cm.cfg")
        }
    };
    let (snap, conditions, progress) = aos_cm::status::load(&path)?;
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&aos_cm::status::json(
                &snap,
                &conditions,
                progress.as_deref()
            ))?
        );
    } else {
        print!(
            "{}",
            aos_cm::status::text(&snap, &conditions, progress.as_deref())
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_plans(plans: &[aos_cm::model::Plan], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&render::plan_json(plans))?
        );
    } else {
        print!("{}", render::plan_text(plans));
    }
    Ok(())
}

fn plan_store(path: &std::path::Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let file = if path.is_dir() {
        path.join("cm.redb")
    } else {
        path.to_path_buf()
    };
    if !file.exists() {
        anyhow::bail!("{}: no store there", file.display());
    }
    let store = aos_cm::store::Store::open(&file).with_context(|| file.display().to_string())?;
    let snap = store
        .shared_snapshot()
        .with_context(|| format!("{}: reading the store", file.display()))?;
    let now = aos_cm::engine::wall_clock()();
    print_plans(&reconcilers::plan_all(&snap, now), as_json)?;
    Ok(ExitCode::SUCCESS)
}

fn detect(v: &serde_json::Value) -> Option<Kind> {
    let o = v.as_object()?;
    let has = |k: &str| o.keys().any(|x| x.eq_ignore_ascii_case(k));
    if has("header") || has("data") {
        Some(Kind::Frame)
    } else if has("formatVersion") || (has("nodes") && has("version")) {
        Some(Kind::Unitconfig)
    } else if config::looks_like_config(v) {
        Some(Kind::Config)
    } else {
        None
    }
}

fn validate(file: &std::path::Path, kind: Option<Kind>) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let report = |probs: &Problems| {
        for p in &probs.0 {
            eprintln!("{}: {p}", file.display());
        }
        Ok(ExitCode::from(EXIT_INVALID))
    };
    let value = match json::parse(&text) {
        Ok(v) => v,
        Err(p) => return report(&p),
    };
    let Some(kind) = kind.or_else(|| detect(&value)) else {
        let mut p = Problems::default();
        p.push(
            "$",
            "not a v7 frame, a unit config or an aos_cm.cfg (use --kind to say which)",
        );
        return report(&p);
    };
    let name = file.display().to_string();
    match kind {
        Kind::Frame => {
            let mut probs = Problems::default();
            match desired::envelope(&value, &mut probs) {
                Some((_, data, t)) if t == "desiredStatus" => {
                    desired::from_data(&data, &mut probs);
                }
                // Every other message type: its body against the v7 message types.
                Some(_) if probs.is_empty() => {
                    if let Err(e) = aos_cm::api::cloud::messages::parse_incoming(&text) {
                        probs.push("data", e);
                    }
                }
                _ => {}
            }
            if !probs.is_empty() {
                return report(&probs);
            }
        }
        Kind::Unitconfig => {
            if let Err(p) = unitconfig::parse(&text) {
                return report(&p);
            }
        }
        Kind::Config => match Config::from_json_str(&text, &name) {
            Ok((_, warnings)) => {
                for w in warnings {
                    eprintln!("warning: {w}");
                }
            }
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::from(EXIT_INVALID));
            }
        },
    }
    println!(
        "{name}: valid {}",
        match kind {
            Kind::Frame => "v7 frame",
            Kind::Unitconfig => "unit config",
            Kind::Config => "aos_cm.cfg",
        }
    );
    Ok(ExitCode::SUCCESS)
}
