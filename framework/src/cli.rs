//! The shared command line of design §4: each binary's `main` is `framework::cli::main::<S>()`,
//! written `framework::service_main!(S);` (which also sets the services' allocator).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, ConfigError, LoadOptions};
use crate::connection::bounded;
use crate::dlq;
use crate::processor::{MessageProcessor, ProcessorConfiguration};
use crate::runtime::{Runtime, Status, connect};
use crate::telemetry;
use crate::topology::Topology;

/// Boxed error from a service's own setup code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a service listens and what it publishes to, beside its output exchange: the
/// static half of a [`ProcessorConfiguration`], declared with the service's topology.
#[derive(Debug, Clone, Default)]
pub struct Binding {
    /// Producer exchange.
    pub exchange: String,
    /// Binding keys.
    pub routing_keys: Vec<String>,
    /// Success key prefix.
    pub output_routing_key: String,
    /// Other exchanges the service owns and publishes to (topic, durable), declared with
    /// its topology on `declare` and every (re)connect.
    pub publishes_to: Vec<String>,
    /// One consumer of `Q` at a time, whatever the replicas (`x-single-active-consumer`):
    /// for a service that must handle its messages in order, a second replica (a rolling
    /// update's surge, a scale-out by mistake) or a reconnect that beat the broker's own
    /// notice of the old connection would otherwise take the next message while the
    /// first is still being handled.
    pub single_active_consumer: bool,
    /// Why this service, as configured, should have one consumer of `Q` at a time (None:
    /// any number): warned about, naming it, when the queue watcher finds `Q` with more
    /// than one consumer (project-ingest unordered: several replicas may apply updates of
    /// one time out of order).
    pub one_consumer_advised: Option<String>,
}

/// A service binary: its names, its settings and how to build its processor.
#[async_trait]
pub trait Service: Send + Sync + 'static {
    /// Binary name, used in logs, `x-service` and connection names.
    const NAME: &'static str;
    /// Own config section, e.g. `online_archive`.
    const SECTION: &'static str;
    /// One line for `--help`: what this service does.
    const ABOUT: &'static str = "a storagetier service";
    /// The service's own keys (deny unknown fields); framework keys are taken out first.
    type Settings: DeserializeOwned + Serialize + std::fmt::Debug + Send + Sync + 'static;
    /// Its processor.
    type Processor: MessageProcessor;

    /// Exchange, binding keys and output key (no I/O, so `declare` needs nothing else).
    /// `[<section>] input_exchange` in the config overrides the exchange.
    fn binding(cfg: &Config<Self::Settings>) -> Binding;

    /// Settles what the service's own settings imply for the framework's (event-forwarder's
    /// ordered mode takes one message at a time, whatever `[amqp] prefetch` the shared
    /// files give every service), before any check and for every command, so `check-config`
    /// shows what runs.
    fn settle(_cfg: &mut Config<Self::Settings>) {}

    /// Checks the settings the topology is made of (exchange names, binding keys) beyond
    /// their types, for every command; errors exit 2.
    fn validate_topology(_cfg: &Config<Self::Settings>) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Checks the rest of the settings beyond their types, for `run`, `check-config` and
    /// the service's own commands (not `declare`, `definitions`, `dlq`: they need only the
    /// bus); errors exit 2.
    fn validate(_cfg: &Config<Self::Settings>) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Where the settings left unset lead (directories and databases under the data
    /// directory), shown by `check-config` as `resolved` beside the settings themselves
    /// (secrets redacted); None when nothing is derived.
    fn resolved(_cfg: &Config<Self::Settings>) -> Option<serde_json::Value> {
        None
    }

    /// Builds the processor (opens databases, stores, HTTP clients).
    async fn processor(cfg: &Config<Self::Settings>) -> Result<Self::Processor, BoxError>;

    /// Subcommands of the service's own (e.g. snapshot-status `status`), listed in `--help`
    /// beside the framework's; `--config-dir` and `--env` apply to them too.
    fn extra_commands() -> Vec<clap::Command> {
        Vec::new()
    }

    /// Runs one of [`Service::extra_commands`] (`name`, its parsed arguments) with the
    /// loaded config; a [`Failure`] exits like the framework's own commands (2 or 1).
    async fn run_extra(
        name: &str,
        _args: &clap::ArgMatches,
        _cfg: Config<Self::Settings>,
    ) -> Result<(), Failure> {
        Err(Failure::Usage(format!("unknown command `{name}`")))
    }
}

#[derive(Parser, Debug)]
#[command(about, version)]
struct Cli {
    /// Directory holding default.toml and <env>.toml.
    #[arg(
        long,
        global = true,
        env = "STORAGETIER_CONFIG_DIR",
        default_value = "config"
    )]
    config_dir: PathBuf,
    /// Environment name: reads <config-dir>/<env>.toml (default dev).
    #[arg(long, global = true, env = "APP_ENV")]
    env: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume until SIGTERM/SIGINT, then drain and exit 0 (the default).
    Run,
    /// Validate and print the effective config (secrets redacted).
    CheckConfig,
    /// Declare the topology and exit.
    Declare,
    /// Print the topology as RabbitMQ definitions JSON (management UI import).
    Definitions {
        /// Virtual host to put in the document (default: the one `[amqp] url` names).
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        vhost: Option<String>,
    },
    /// Inspect and repair dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// Show dead letters: error, kind, original key, failed-at, size.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to this service's own queue (they keep their original
    /// exchange and routing key as headers).
    Replay {
        /// Every dead letter (this or --message-id is needed).
        #[arg(long, conflicts_with = "message_id")]
        all: bool,
        /// Only the dead letter(s) with this message id.
        #[arg(long)]
        message_id: Option<String>,
        /// Only this x-error-kind (permanent, retries-exhausted) or broker x-death reason.
        #[arg(long, value_parser = crate::dlq::KINDS)]
        kind: Option<String>,
        /// Only original routing keys matching this topic pattern (`*` a word, `#` any).
        #[arg(long, value_name = "PATTERN")]
        key: Option<String>,
        /// Only dead letters that failed at least this long ago (90s, 30m, 2h, 7d); one
        /// whose failure time is unknown (put there by hand) counts as old.
        #[arg(long, value_name = "AGE", value_parser = crate::dlq::parse_age)]
        older_than: Option<std::time::Duration>,
        /// At most this many.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// At most this many per second.
        #[arg(long, value_name = "PER_SECOND")]
        rate: Option<f64>,
        /// Show what would move, move nothing.
        #[arg(long)]
        dry_run: bool,
        /// One JSON object per dead letter moved (as `dlq list --json` shows them, with
        /// `"action"`), then `{"summary": …}`, instead of text lines.
        #[arg(long)]
        json: bool,
    },
    /// Delete every dead letter.
    Purge {
        /// Required: confirms the deletion.
        #[arg(long)]
        yes: bool,
    },
}

/// A global option given more than once in `args`: clap takes the last one where one is
/// before the command and one after it (`--env prod dlq purge --yes --env dev` purged dev),
/// which an operator who typed both did not mean.
fn given_twice(args: impl Iterator<Item = std::ffi::OsString>) -> Option<&'static str> {
    let mut seen: Vec<&'static str> = Vec::new();
    for a in args {
        let Some(a) = a.to_str() else { continue };
        if a == "--" {
            break;
        }
        for flag in ["--env", "--config-dir"] {
            if a == flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')) {
                if seen.contains(&flag) {
                    return Some(flag);
                }
                seen.push(flag);
            }
        }
    }
    None
}

/// Exit code for configuration and usage errors.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for any other failure.
pub const EXIT_FAILURE: u8 = 1;

/// Parses the command line, loads config and runs the command; the whole `main` of a binary.
pub fn main<S: Service>() -> ExitCode {
    let extra = S::extra_commands();
    let extra_names: Vec<String> = extra.iter().map(|c| c.get_name().to_string()).collect();
    let cmd = Cli::command()
        .name(S::NAME)
        .about(format!("{}: {}", S::NAME, S::ABOUT))
        .subcommands(extra);
    let matches = cmd.get_matches();
    if let Some(flag) = given_twice(std::env::args_os().skip(1)) {
        print_err(&format!(
            "{}: {flag} was given more than once (before and after the command?): give it once",
            S::NAME
        ));
        return ExitCode::from(EXIT_CONFIG);
    }
    let own = matches
        .subcommand()
        .filter(|(name, _)| extra_names.iter().any(|n| n == name))
        .map(|(name, m)| (name.to_string(), m.clone()));
    let cli = if own.is_some() {
        // The service's own command: only the global options are the framework's.
        Cli {
            config_dir: matches
                .get_one::<PathBuf>("config_dir")
                .cloned()
                .unwrap_or_else(|| PathBuf::from("config")),
            env: matches.get_one::<String>("env").cloned(),
            command: None,
        }
    } else {
        match Cli::from_arg_matches(&matches) {
            Ok(c) => c,
            Err(e) => e.exit(),
        }
    };
    let opts = LoadOptions {
        config_dir: Some(cli.config_dir.clone()),
        // Named on the command line (`--config-dir D` or `--config-dir=D`) or by
        // STORAGETIER_CONFIG_DIR, not the default `./config`.
        config_dir_explicit: matches
            .value_source("config_dir")
            .is_some_and(|s| s != clap::parser::ValueSource::DefaultValue),
        env_name: cli.env.clone(),
        env_vars: None,
        overrides: Vec::new(),
    };
    // The bus-only commands need the topology, not a service able to run: an operator reads
    // event-forwarder's DLQ without naming its endpoint. Every key is still type-checked.
    let bus_only = matches!(
        cli.command,
        Some(Command::Declare | Command::Definitions { .. } | Command::Dlq { .. })
    );
    let loaded = if bus_only {
        loaded_settled::<S>(&opts).and_then(|cfg| S::validate_topology(&cfg).map(|()| cfg))
    } else {
        load_config::<S>(&opts)
    };
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            print_err(&format!("{}: {e}", S::NAME));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init_logging(&cfg.log);
    raise_open_files_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(runtime_stack())
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            print_err(&format!("{}: cannot start the async runtime: {e}", S::NAME));
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    // On a worker thread, not the thread blocked in `block_on`: the consuming loop then
    // spawns each handler onto its own worker's queue, where it runs next, instead of
    // waking another thread for every message.
    let command = cli.command;
    let result = rt.block_on(async move {
        let work = tokio::spawn(async move {
            match (own, command.unwrap_or(Command::Run)) {
                (Some((name, args)), _) => {
                    until_signalled(S::run_extra(&name, &args, cfg), HELD_GOES_BACK).await
                }
                // These two stop on a signal their own way: a drain, a replay's summary.
                (
                    None,
                    c @ (Command::Run
                    | Command::Dlq {
                        command: DlqCommand::Replay { .. },
                    }),
                ) => execute::<S>(c, cfg).await,
                (None, c) => {
                    // A purge sent is carried out by the broker whatever the client does next.
                    let left = match &c {
                        Command::Dlq {
                            command: DlqCommand::Purge { .. },
                        } => "the broker may have purged the DLQ all the same: `dlq list` shows what is left",
                        _ => HELD_GOES_BACK,
                    };
                    until_signalled(execute::<S>(c, cfg), left).await
                }
            }
        });
        work.await
            .unwrap_or_else(|e| Err(Failure::Other(format!("the service stopped: {e}"))))
    });
    // A blocking thread still stuck in a syscall (an open on a share whose server stopped
    // answering) would keep a dropped runtime, and the process, waiting for ever after
    // the drain: it is left behind, and the process exits with it.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    // A configuration found wanting once logging is up (a database refusing the login, an
    // address that cannot be listened on) is logged as any other failure.
    if let Err(Failure::Other(m) | Failure::Usage(m)) = &result
        && telemetry::logs_json()
    {
        tracing::error!("{m}");
    }
    telemetry::flush_logs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            print_err(&format!("{}: {m}", S::NAME));
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(m)) => {
            print_err(&format!("{}: {m}", S::NAME));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Loads and validates a service's configuration.
pub fn load_config<S: Service>(opts: &LoadOptions) -> Result<Config<S::Settings>, ConfigError> {
    let cfg = loaded_settled::<S>(opts)?;
    S::validate_topology(&cfg)?;
    S::validate(&cfg)?;
    Ok(cfg)
}

/// Loads service `S`'s configuration and settles it ([`Service::settle`]), unchecked.
fn loaded_settled<S: Service>(opts: &LoadOptions) -> Result<Config<S::Settings>, ConfigError> {
    let mut cfg = config::load::<S::Settings>(S::SECTION, opts)?;
    S::settle(&mut cfg);
    check_no_loop::<S>(&cfg)?;
    Ok(cfg)
}

/// Refuses a service whose subscriptions would bring its own messages back to it: a
/// binding to its own retry or fail exchange, or to its output exchange with a key that
/// matches its success messages' (every success came back as a new input, for ever:
/// event-forwarder posting each event again and again); and an output exchange named as
/// its own retry or fail exchange (its successes went to its own DLQ).
fn check_no_loop<S: Service>(cfg: &Config<S::Settings>) -> Result<(), ConfigError> {
    let binding = binding_of::<S>(cfg);
    let topo = Topology::of(&binding, cfg);
    let section = S::SECTION;
    let output = &cfg.service.output_exchange;
    let own = [topo.fail_exchange(), topo.retry_exchange()];
    if own.contains(output) {
        return Err(ConfigError::new(
            format!("{section}.output_exchange"),
            format!(
                "`{output}` is the service's own retry or dead-letter exchange: its success \
                 messages would go there"
            ),
        ));
    }
    let success = format!("{}.success", binding.output_routing_key);
    let looping = own.contains(&binding.exchange)
        || (binding.exchange == *output
            && binding
                .routing_keys
                .iter()
                .any(|k| crate::dlq::topic_matches(k, &success)));
    if looping {
        let key = if cfg.service.input_exchange.is_some() {
            "input_exchange"
        } else {
            "output_exchange"
        };
        return Err(ConfigError::new(
            format!("{section}.{key}"),
            format!(
                "the service would consume its own messages from `{}` (its success messages, \
                 `{success}`, or its retries and dead letters): they would come back to it \
                 without end",
                binding.exchange
            ),
        ));
    }
    Ok(())
}

/// Stack reserved for threads that do not choose theirs, among them the AMQP client's I/O
/// thread, which parses every frame it reads recursively, at 16-20 KiB a level: a
/// producer's message with a header nested 26,000 deep (what fits in a 128 KiB frame)
/// overflowed the default 2 MiB (and 256 MiB) and aborted the process, and again on every
/// redelivery, in every instance. The vendored parser now reads what lies deeper than 64
/// levels as bytes (vendor/README.md), which bounds it for an embedding application too;
/// the reserve stays for whatever else recurses on such threads. Address space only: what
/// a thread does not use is never touched.
const THREAD_STACK: usize = 1 << 30;

/// Stack of the async runtime's threads, which clone, measure and drop a message's headers
/// recursively (a header nested too deeply for a retry is dead-lettered without them).
const RUNTIME_STACK: usize = 64 << 20;

/// Sets [`THREAD_STACK`] as the default of threads started from now on (an operator's
/// `RUST_MIN_STACK` wins). [`crate::service_main!`] calls it first thing in `main`.
///
/// # Safety
/// No other thread may exist yet (it sets an environment variable).
#[doc(hidden)]
pub unsafe fn reserve_stacks() {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: the caller guarantees this process has no other thread yet.
        unsafe { std::env::set_var("RUST_MIN_STACK", THREAD_STACK.to_string()) };
    }
}

/// Raises this process's soft limit of open files to its hard limit. Each copy, connection,
/// pooled database handle and staged upload holds descriptors, and the soft limit most
/// hosts and service managers set (1,024) is below what a busy service needs, while the
/// hard limit they allow is far above it; out of descriptors, every file is refused at once.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write only the one struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        let was = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            tracing::debug!(was, now = limit.rlim_cur, "raised the open files limit");
        } else {
            tracing::warn!(
                soft = was,
                hard = limit.rlim_max,
                error = %std::io::Error::last_os_error(),
                "cannot raise the open files limit to its hard limit"
            );
        }
    }
}

/// The async runtime's thread stack: [`RUNTIME_STACK`], or less where the operator set
/// `RUST_MIN_STACK` lower (a host that limits address space).
fn runtime_stack() -> usize {
    std::env::var("RUST_MIN_STACK")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(RUNTIME_STACK, |v| v.min(RUNTIME_STACK))
}

/// Why a command failed: usage (exit 2) or anything else (exit 1).
pub enum Failure {
    /// Bad usage or configuration.
    Usage(String),
    /// Any other failure.
    Other(String),
}

/// The service's binding with the config's `input_exchange` override applied.
pub fn binding_of<S: Service>(cfg: &Config<S::Settings>) -> Binding {
    let mut b = S::binding(cfg);
    if let Some(ex) = &cfg.service.input_exchange {
        b.exchange = ex.clone();
    }
    b
}

/// Builds service `S`'s processor and binds it as `cfg` says: what the binary runs and
/// what the test harness starts in-process.
pub async fn processor_configuration<S: Service>(
    cfg: &Config<S::Settings>,
) -> Result<ProcessorConfiguration<S::Processor>, BoxError> {
    let processor = S::processor(cfg).await?;
    Ok(ProcessorConfiguration {
        binding: binding_of::<S>(cfg),
        processor,
    })
}

/// The topology service `S` declares with `cfg`.
pub fn topology_of<S: Service>(cfg: &Config<S::Settings>) -> Topology {
    Topology::of(&binding_of::<S>(cfg), cfg)
}

async fn execute<S: Service>(cmd: Command, cfg: Config<S::Settings>) -> Result<(), Failure> {
    let other = |e: &dyn std::fmt::Display| Failure::Other(e.to_string());
    match cmd {
        Command::Run => run_service::<S>(cfg, shutdown_on_signal()).await.map(drop),
        Command::CheckConfig => {
            let mut shown = serde_json::to_value(&cfg).map_err(|e| other(&e))?;
            if let (Some(r), Some(o)) = (S::resolved(&cfg), shown.as_object_mut()) {
                o.insert("resolved".into(), r);
            }
            let text = serde_json::to_string_pretty(&shown).map_err(|e| other(&e))?;
            // What `run` warns about at start, said here too (beside the JSON, not in it):
            // a check in CI passed `drain_timeout_ms = 30` unremarked.
            for slip in cfg.warnings() {
                print_err(&format!("warning: {slip}"));
            }
            print_out(&format!("{text}\n"))
        }
        Command::Declare => {
            let topo = topology_of::<S>(&cfg);
            let conn = connect(&cfg.amqp, S::NAME).await.map_err(|e| {
                Failure::Other(format!(
                    "cannot connect to {}: {e}{}",
                    cfg.amqp.endpoints_shown(),
                    crate::connection::refusal_hint(&e)
                ))
            })?;
            let limit = cfg.amqp.operation_timeout();
            crate::session::bounded_declare(&topo, &conn, limit, true)
                .await
                .map_err(|e| {
                    if e.is_conflict() {
                        other(&crate::runtime::RuntimeError::TopologyConflict(
                            e.to_string(),
                        ))
                    } else {
                        other(&e)
                    }
                })?;
            let _ = bounded(
                limit,
                "connection.close",
                conn.close(200, "declared".into()),
            )
            .await;
            print_out(&format!(
                "declared queue {} (+{} retry tiers, {}), exchanges {}, {}, {}\n",
                topo.queue,
                topo.delays_ms.len(),
                topo.dlq(),
                topo.retry_exchange(),
                topo.fail_exchange(),
                topo.output_exchange
            ))
        }
        Command::Definitions { vhost } => {
            let topo = topology_of::<S>(&cfg);
            // The vhost the service would declare in: importing the document elsewhere
            // builds a topology nothing consumes from.
            let vhost = vhost.unwrap_or_else(|| {
                let first = cfg.amqp.endpoints().first().map(|u| u.vhost());
                first.unwrap_or_else(|| "/".to_string())
            });
            let text =
                serde_json::to_string_pretty(&topo.definitions(&vhost)).map_err(|e| other(&e))?;
            print_out(&format!("{text}\n"))
        }
        Command::Dlq { command } => {
            // A command refused for its arguments costs no connection (nor its timeout
            // when the broker is down) and exits 2, as every usage error does.
            check_dlq_usage(&command)?;
            let topo = topology_of::<S>(&cfg);
            // `replay --json` ends with its summary even when it cannot begin.
            let json_replay = match &command {
                DlqCommand::Replay {
                    json: true,
                    dry_run,
                    ..
                } => Some(*dry_run),
                _ => None,
            };
            let failed = |m: String| {
                if let Some(dry_run) = json_replay {
                    let _ = replay_summary(dry_run, 0, &topo.queue, Some(&m));
                }
                Failure::Other(m)
            };
            // A replay stops on a signal its own way (the other commands where they
            // stand: `until_signalled`); before it begins, at the first.
            let signals =
                matches!(command, DlqCommand::Replay { .. }).then(first_and_second_signal);
            let first = signals.as_ref().map(|(first, _)| first);
            let second = signals.as_ref().map(|(_, second)| second);
            let not_begun = || failed("stopped by a signal before it began".into());
            let conn = unless_stopped(first, connect(&cfg.amqp, S::NAME))
                .await
                .ok_or_else(not_begun)?
                .map_err(|e| {
                    failed(format!(
                        "cannot connect to {}: {e}{}",
                        cfg.amqp.endpoints_shown(),
                        crate::connection::refusal_hint(&e)
                    ))
                })?;
            let limit = cfg.amqp.operation_timeout();
            if !matches!(command, DlqCommand::Purge { .. })
                && let Some(Ok(Ok(true))) = unless_stopped(
                    first,
                    tokio::time::timeout(limit, topo.dlq_delivery_limit_kept(&conn)),
                )
                .await
            {
                let vhost = cfg
                    .amqp
                    .endpoints()
                    .first()
                    .map_or_else(|| "/".to_string(), |u| u.vhost());
                tracing::warn!(queue = %topo.dlq(),
                    "this DLQ was declared by an earlier release with RabbitMQ's default delivery \
                     limit: on RabbitMQ 4.x, unless a policy already lifts it (AMQP cannot see \
                     policies), every look at a dead letter (dlq list, replay --dry-run, a \
                     filtered replay) counts as a delivery, and one looked at 20 times is \
                     dropped. On 4.x only, lift it with a policy of its own (rabbitmqctl \
                     set_policy -p '{}' --apply-to quorum_queues --priority 10 '{}-unlimited' \
                     '^{}$' '{{\"delivery-limit\":-1}}'; only one policy applies to a queue, so \
                     add any other one's keys to it), or move the dead letters away and delete \
                     the queue for the service to declare it again. On RabbitMQ 3.x there is \
                     nothing to do (no default limit), and that policy would drop a dead letter \
                     at its first return",
                    vhost,
                    topo.dlq(),
                    regex_escape(&topo.dlq()));
            }
            let r = match unless_stopped(first, dlq::exclusive(&conn, &topo)).await {
                Some(Ok(())) => dlq_command(&conn, &topo, command, signals.clone()).await,
                Some(Err(e)) => Err(failed(e.to_string())),
                None => Err(not_begun()),
            };
            // After a stop, not waited for long: a broker blocking publishes (a resource
            // alarm: the stop's reason to return at once) does not read the close either,
            // and what the connection held returns to it as it drops.
            let close_within = match first.is_some_and(|f| f.is_cancelled()) {
                true => limit.min(STOPPED_CLOSE),
                false => limit,
            };
            let close = bounded(
                close_within,
                "connection.close",
                conn.close(200, "done".into()),
            );
            let _ = unless_stopped(second, close).await;
            r
        }
    }
}

/// How long a `dlq` command stopped by a signal waits for its connection's close.
const STOPPED_CLOSE: std::time::Duration = std::time::Duration::from_secs(1);

/// `name` as a regular expression matching only itself (a policy's pattern).
fn regex_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The `dlq` arguments clap cannot check on its own.
fn check_dlq_usage(cmd: &DlqCommand) -> Result<(), Failure> {
    match cmd {
        DlqCommand::Replay {
            all: false,
            message_id: None,
            ..
        } => Err(Failure::Usage(
            "dlq replay needs --all or --message-id ID".into(),
        )),
        // A blank id matches nothing, yet the look would hold the whole DLQ to find it (a
        // script's unset variable).
        DlqCommand::Replay {
            message_id: Some(id),
            ..
        } if id.trim().is_empty() => Err(Failure::Usage("--message-id must not be blank".into())),
        DlqCommand::Replay { rate, .. } if rate.is_some_and(|r| !(r >= 0.001 && r.is_finite())) => {
            Err(Failure::Usage(
                "--rate must be a number of messages per second, at least 0.001".into(),
            ))
        }
        // Zero would still take a dead letter to look at (a delivery, on a quorum DLQ) and
        // report none matched; a list would read the whole DLQ to show none of it.
        DlqCommand::Replay { limit: Some(0), .. } | DlqCommand::List { limit: 0, .. } => {
            Err(Failure::Usage("--limit must be at least 1".into()))
        }
        DlqCommand::Purge { yes: false } => Err(Failure::Usage(
            "dlq purge deletes every dead letter: pass --yes to confirm".into(),
        )),
        _ => Ok(()),
    }
}

/// `work`, or None where `stop` is cancelled first.
async fn unless_stopped<T>(
    stop: Option<&CancellationToken>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    match stop {
        None => Some(work.await),
        Some(stop) => tokio::select! {
            biased;
            r = work => Some(r),
            () = stop.cancelled() => None,
        },
    }
}

/// `signals`: a replay's first and second signal ([`first_and_second_signal`]).
async fn dlq_command(
    conn: &lapin::Connection,
    topo: &Topology,
    cmd: DlqCommand,
    signals: Option<(CancellationToken, CancellationToken)>,
) -> Result<(), Failure> {
    let other = |e: &dyn std::fmt::Display| {
        let m = e.to_string();
        // The queues exist once the service has declared them (`declare`, or its start).
        if m.contains("NOT_FOUND") && m.contains("no queue") {
            Failure::Other(format!(
                "{m} — is the topology declared? The service's `declare` command (or its \
                 first start) creates it"
            ))
        } else {
            Failure::Other(m)
        }
    };
    match cmd {
        DlqCommand::List { limit, json } => {
            // Each dead letter written as it is read, so one stopped (a signal, a broker
            // error) has shown what it read — by a thread of its own: a reader that does not
            // read on (`| less` left unscrolled) blocks that thread, not the look, which
            // still gives everything back within its hold limit (the rows wait in memory).
            let (rows, written) = std::sync::mpsc::channel::<String>();
            let writer = std::thread::spawn(move || write_rows(written));
            let row = |text: String| {
                let _ = rows.send(text);
            };
            if !json {
                row(format!(
                    "{:<38} {:<18} {:<26} {:>8}  {:<40} ERROR\n",
                    "MESSAGE-ID", "KIND", "FAILED-AT", "SIZE", "ORIGINAL-KEY"
                ));
            }
            let looked = dlq::list_each(conn, topo, limit, dlq::HOLD_AT_MOST, |i| {
                let line = if json {
                    match serde_json::to_string(&i) {
                        Ok(line) => crate::telemetry::json_for_terminal(line),
                        Err(e) => format!("{{\"error\": {:?}}}", e.to_string()),
                    }
                } else {
                    let field = |s: Option<&str>| crate::dlq::printable(s.unwrap_or("-"));
                    format!(
                        "{:<38} {:<18} {:<26} {:>8}  {:<40} {}",
                        field(i.message_id.as_deref()),
                        field(i.kind.as_deref()),
                        field(i.failed_at.as_deref()),
                        i.size,
                        crate::dlq::printable(&format!(
                            "{}/{}",
                            i.original_exchange, i.original_routing_key
                        )),
                        field(i.error.as_deref())
                    )
                };
                row(format!("{line}\n"));
            })
            .await;
            // Summed up below the table (on stderr for JSON, stdout keeping one dead letter
            // per line): whether `--limit` left some out.
            let shown = looked.as_ref().ok().map(|looked| {
                format!(
                    "{} of {} dead letter(s) in {} shown{}",
                    looked.shown,
                    looked.total,
                    topo.dlq(),
                    if looked.cut_short {
                        format!(
                            " (the look stopped after {} min holding them unacknowledged, \
                             before the broker's consumer timeout would take them back: ask \
                             for fewer with --limit)",
                            dlq::HOLD_AT_MOST.as_secs() / 60
                        )
                    } else {
                        String::new()
                    }
                )
            });
            if let (Some(shown), false) = (&shown, json) {
                row(format!("{shown}\n"));
            }
            // What was read is written out before the command ends, a failed look's too.
            drop(rows);
            let written = tokio::task::spawn_blocking(move || writer.join())
                .await
                .map_err(|e| other(&e))?
                .unwrap_or_else(|_| Err(Failure::Other("the output writer failed".into())));
            looked.map_err(|e| other(&e))?;
            if let (Some(shown), true) = (&shown, json) {
                print_err(shown);
            }
            written
        }
        DlqCommand::Replay {
            all: _,
            message_id,
            kind,
            key,
            older_than,
            limit,
            rate,
            dry_run,
            json,
        } => {
            let wanted = message_id.clone();
            let filter = dlq::Filter {
                message_id,
                kind,
                key,
                older_than,
                limit,
                per_second: rate,
                hold_at_most: None,
                // Ctrl-C stops it between two dead letters, a second one at once, saying
                // how far it got either way.
                stop: signals.as_ref().map(|(first, _)| first.clone()),
                stop_now: signals.as_ref().map(|(_, second)| second.clone()),
            };
            let verb = if dry_run { "would replay" } else { "replayed" };
            // Each line as its dead letter is moved: a replay cut short has said which.
            let mut unwritten = None;
            let action = replay_action(dry_run);
            let mut seen = 0usize;
            let replaying = dlq::replay_each(conn, topo, &filter, dry_run, |i| {
                seen += 1;
                let line = if json {
                    // A script reads ids with spaces or ` -> ` in them whole.
                    let mut v = serde_json::to_value(i).unwrap_or_default();
                    v["action"] = action.into();
                    v["queue"] = topo.queue.clone().into();
                    format!("{}\n", crate::telemetry::json_for_terminal(v.to_string()))
                } else {
                    // Escaped as `dlq list` does: the names come from whoever published.
                    format!(
                        "{verb} {} -> {} (first published to {}/{})\n",
                        crate::dlq::printable(i.message_id.as_deref().unwrap_or("-")),
                        topo.queue,
                        crate::dlq::printable(&i.original_exchange),
                        crate::dlq::printable(&i.original_routing_key)
                    )
                };
                if unwritten.is_none() {
                    unwritten = print_out(&line).err();
                }
            });
            // Between two broker calls (each bounded by the operation timeout) a second
            // signal ends it where it stands; one waiting for a confirm ends itself,
            // naming that copy.
            let second = signals.as_ref().map(|(_, second)| second);
            let replayed = unless_stopped(second, replaying)
                .await
                .unwrap_or(Err(match dry_run {
                    true => dlq::DlqError::DryRunStoppedNow(seen),
                    false => dlq::DlqError::StoppedNow {
                        moved: seen,
                        left: filter.left_after(seen),
                    },
                }));
            let moved = replayed.map_err(|e| {
                if json {
                    let _ = replay_summary(dry_run, seen, &topo.queue, Some(&e.to_string()));
                }
                other(&e)
            })?;
            if let Some(e) = unwritten {
                return Err(e);
            }
            // A script replaying one message learns it was not there (a mistyped id), in
            // its summary's `error` too.
            let unmatched = match wanted {
                Some(id) if moved == 0 => Some(format!(
                    "no dead letter in {} matched --message-id `{}` (and the other filters)",
                    topo.dlq(),
                    crate::dlq::printable(&id)
                )),
                _ => None,
            };
            if json {
                replay_summary(dry_run, moved, &topo.queue, unmatched.as_deref())?;
            } else {
                print_out(&format!("{verb} {moved} dead letter(s)\n"))?;
            }
            match unmatched {
                Some(why) => Err(Failure::Other(why)),
                None => Ok(()),
            }
        }
        DlqCommand::Purge { .. } => {
            let n = dlq::purge(conn, topo).await.map_err(|e| other(&e))?;
            print_out(&format!("purged {n} dead letter(s) from {}\n", topo.dlq()))
        }
    }
}

/// What `dlq replay --json` says it did to each dead letter.
fn replay_action(dry_run: bool) -> &'static str {
    if dry_run { "would_replay" } else { "replayed" }
}

/// `dlq replay --json`'s last line: what it did to how many dead letters of `queue`, and
/// the error that ended it early, if one did (a script learns how far it got).
fn replay_summary(
    dry_run: bool,
    moved: usize,
    queue: &str,
    error: Option<&str>,
) -> Result<(), Failure> {
    let action = replay_action(dry_run);
    let mut summary = serde_json::json!({"action": action, "moved": moved, "queue": queue});
    if let Some(e) = error {
        summary["error"] = e.into();
    }
    let line =
        crate::telemetry::json_for_terminal(serde_json::json!({ "summary": summary }).to_string());
    print_out(&format!("{line}\n"))
}

/// Writes a command's output to stdout; a reader that stopped early (`dlq list | head`)
/// is no failure of the command, any other write error is.
pub fn print_out(text: &str) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::Other(format!("cannot write the output: {e}")))
        }
        _ => Ok(()),
    }
}

/// Writes `dlq list`'s rows to stdout as they come, until the sender is done. A reader that
/// stops early (`| head`) is no error, and is written no more; another write error is the
/// command's failure once every row was taken.
fn write_rows(rows: std::sync::mpsc::Receiver<String>) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut result = Ok(());
    let mut open = true;
    for text in rows {
        if !open {
            continue;
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            open = false;
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                result = Err(Failure::Other(format!("cannot write the output: {e}")));
            }
        }
    }
    result
}

/// Writes `text` and a newline to stderr, ignoring a stderr nobody reads any more
/// (`eprintln!` would panic, turning exit code 2 into 101).
fn print_err(text: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// `work` (a command other than `run` and `dlq replay`) until it ends or SIGTERM or SIGINT
/// comes: then it fails at once (exit 1), its connection closed with the process (the
/// broker takes back whatever it held). Left to the signals' default, a process that
/// ignores them — PID 1 of a container without an init, a script's background job — went
/// on for the whole of its timeouts: `dlq list` held every dead letter and the DLQ's lock
/// for up to 5 minutes, `docker stop` waited for its SIGKILL.
/// `left` says what the stop leaves behind.
async fn until_signalled(
    work: impl std::future::Future<Output = Result<(), Failure>>,
    left: &str,
) -> Result<(), Failure> {
    unless_stopped(Some(&shutdown_on_signal()), work)
        .await
        .unwrap_or_else(|| {
            Err(Failure::Other(format!(
                "stopped by a signal before it finished ({left})"
            )))
        })
}

/// What a command stopped by a signal leaves: nothing, the broker taking back what it held.
const HELD_GOES_BACK: &str = "what it held on the broker goes back";

/// A token cancelled on SIGTERM or SIGINT; a second signal during the drain exits at once
/// (code 1).
pub fn shutdown_on_signal() -> CancellationToken {
    on_signals(None)
}

/// Tokens cancelled by the first and by a second SIGTERM or SIGINT: `dlq replay` stops
/// between two dead letters at the first and at once at the second, and says so either
/// way (how many it moved, a copy whose confirm had not come) — exiting from the signal
/// as `run` does left a script without its summary and an operator without the id of a
/// copy that may still land.
fn first_and_second_signal() -> (CancellationToken, CancellationToken) {
    let second = CancellationToken::new();
    (on_signals(Some(second.clone())), second)
}

/// A token cancelled on SIGTERM or SIGINT; at a second one `second` is cancelled, or
/// without it the process exits at once (code 1).
fn on_signals(second: Option<CancellationToken>) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    // Installed before this returns, not in the task: a SIGTERM that came before the task
    // first ran (while the service opened its database, say) killed the process unhandled.
    #[cfg(unix)]
    let listeners = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        )
    };
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            // Both listeners exist before the first signal and serve the second too: a
            // second signal is not missed once the first has been handled (tokio merges
            // two that arrive before either is read).
            let (mut term, mut int) = match listeners {
                (Ok(term), Ok(int)) => (term, int),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
                    let _ = tokio::signal::ctrl_c().await;
                    t.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            // Cancelled before it is logged: nothing the log does may hold up a stop.
            t.cancel();
            tracing::info!("shutdown requested");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if let Some(second) = second {
                second.cancel();
                tracing::warn!("second signal: stopping at once");
                return;
            }
            // A second signal during the drain means now: exit without waiting for it (the
            // broker gives back whatever was not acked).
            tracing::warn!("second signal: exiting without finishing the drain");
            crate::telemetry::flush_logs();
            std::process::exit(1);
        }
        #[cfg(not(unix))]
        {
            let _ = (second, tokio::signal::ctrl_c().await);
            tracing::info!("shutdown requested");
            t.cancel();
        }
    });
    token
}

/// A running service's handles, for embedding and tests.
pub struct Running {
    /// Readiness and session count.
    pub status: Arc<Status>,
    /// Address the health/metrics server listens on.
    pub http_addr: std::net::SocketAddr,
}

/// Serves HTTP, builds the processor and consumes until `shutdown`; returns after
/// draining (None: stopped while the processor was being built).
pub async fn run_service<S: Service>(
    cfg: Config<S::Settings>,
    shutdown: CancellationToken,
) -> Result<Option<Running>, Failure> {
    // Served before the processor is built: while its database is opened (or another
    // replica's migration holds the lock) the process answers `/healthz` and shows
    // `/readyz` 503 and its metrics, instead of refusing connections until a liveness
    // probe restarts it.
    let status = Arc::new(Status::default());
    let http = Http::serve(&cfg, S::SECTION, status.clone()).await?;
    // Not connected yet, and said so (the NotConnected alert reads it): a series first set
    // once the processor is built was missing while the database was awaited.
    metrics::gauge!(crate::telemetry::CONNECTED).set(0.0);
    // ... and why: still being built (a database, a migration lock), not a broker down.
    metrics::gauge!(crate::telemetry::STARTING).set(1.0);
    metrics::gauge!(crate::telemetry::STOPPING).set(0.0);
    // A stop while the processor is built (its database still refusing connections, or
    // another replica's migration holding the lock) is a stop, exit 0 at once: it waited
    // for the build, then exited 1.
    let built = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            tracing::info!(service = S::NAME, "stopped before it started");
            http.stop().await;
            return Ok(None);
        }
        b = processor_configuration::<S>(&cfg) => b,
    };
    let pc = match built {
        Ok(pc) => pc,
        Err(e) => {
            http.stop().await;
            // A setting no retry fixes (a database refusing the login): exit 2 naming it.
            if let Some(c) = e.downcast_ref::<ConfigError>() {
                return Err(Failure::Usage(c.to_string()));
            }
            return Err(Failure::Other(format!("cannot start: {e}")));
        }
    };
    run_with(S::NAME, &cfg, pc, status, http, shutdown)
        .await
        .map(Some)
}

/// Serves HTTP and runs a processor until `shutdown` (used by services and tests alike).
pub async fn run_processor<P: MessageProcessor, T>(
    name: &str,
    cfg: &Config<T>,
    pc: ProcessorConfiguration<P>,
    shutdown: CancellationToken,
) -> Result<Running, Failure> {
    let status = Arc::new(Status::default());
    let http = Http::serve(cfg, name, status.clone()).await?;
    run_with(name, cfg, pc, status, http, shutdown).await
}

/// The health and metrics server of a running service.
struct Http {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Http {
    /// Listens on `[section] http_listen`, answering with `status`.
    async fn serve<T>(
        cfg: &Config<T>,
        section: &str,
        status: Arc<Status>,
    ) -> Result<Self, Failure> {
        let stop = CancellationToken::new();
        let (addr, task) = crate::http::serve(&cfg.service.http_listen, status, stop.clone())
            .await
            .map_err(|e| {
                let why = format!(
                    "cannot listen on {} ({section}.http_listen): {e}",
                    cfg.service.http_listen
                );
                // An address this host does not have, or no address at all, is the
                // config's fault (exit 2); one in use is another process's (exit 1).
                match e.kind() {
                    std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::InvalidInput => {
                        Failure::Usage(why)
                    }
                    _ => Failure::Other(why),
                }
            })?;
        crate::telemetry::served_from_start();
        Ok(Self { addr, stop, task })
    }

    /// Stops serving and waits for the server to end.
    async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Http {
    /// A caller that drops the service's future (a timeout around it, an aborted task)
    /// leaves no server behind holding the port.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Runs a built processor with its status served by `http` until `shutdown`.
async fn run_with<P: MessageProcessor, T>(
    name: &str,
    cfg: &Config<T>,
    pc: ProcessorConfiguration<P>,
    status: Arc<Status>,
    http: Http,
    shutdown: CancellationToken,
) -> Result<Running, Failure> {
    // Built: from here a 0 connected is the broker's doing (served by every runtime).
    metrics::gauge!(crate::telemetry::STARTING).set(0.0);
    // ... and, once asked to stop, a drain's (`connected` is 0 from the stop on).
    metrics::gauge!(crate::telemetry::STOPPING).set(0.0);
    let stopping = shutdown.clone();
    let stopping = tokio::spawn(async move {
        stopping.cancelled().await;
        metrics::gauge!(crate::telemetry::STOPPING).set(1.0);
    });
    let runtime = Runtime::with_status(name, cfg, pc, status.clone());
    let http_addr = http.addr;
    tracing::info!(service = name, http = %http_addr, "started");
    for slip in cfg.warnings() {
        tracing::warn!("{slip}");
    }
    let r = runtime.run(shutdown).await;
    // Not left waiting on the token once this runtime ended (an error, say): cancelled
    // later, it would say "stopping" for another runtime of the process.
    stopping.abort();
    http.stop().await;
    r.map_err(|e| Failure::Other(e.to_string()))?;
    tracing::info!(service = name, "stopped cleanly");
    Ok(Running { status, http_addr })
}
