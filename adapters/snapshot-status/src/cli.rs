//! The `status <correlation-id>` operator command (outside the framework's CLI, which
//! has no hook for extra subcommands yet).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use framework::cli::{EXIT_CONFIG, EXIT_FAILURE, load_config};
use framework::config::LoadOptions;

use crate::SnapshotStatus;
use crate::store::{Collection, Store};

/// `snapshot-status status <correlation-id> [--config-dir DIR] [--env NAME] [--json]`.
#[derive(Parser, Debug)]
#[command(
    name = "snapshot-status status",
    about = "Print the collections of a correlation id"
)]
pub struct StatusArgs {
    /// Directory holding default.toml and <env>.toml.
    #[arg(long, env = "STORAGETIER_CONFIG_DIR", default_value = "config")]
    pub config_dir: PathBuf,
    /// Environment name: reads <config-dir>/<env>.toml (default dev).
    #[arg(long, env = "APP_ENV")]
    pub env: Option<String>,
    /// One JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The snapshot run to show.
    pub correlation_id: String,
}

/// True when the first positional argument (after global flags) is `status`.
pub fn is_status_command(args: &[String]) -> bool {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config-dir" | "--env" => {
                it.next();
            }
            s if s.starts_with("--") => {}
            s => return s == "status",
        }
    }
    false
}

/// Renders collections as a table.
pub fn render_table(correlation_id: &str, product: Option<&str>, cs: &[Collection]) -> String {
    let opt = |v: Option<i64>| v.map_or("-".to_string(), |n| n.to_string());
    let mut out = format!(
        "correlation id: {correlation_id}\nproduct status: {}\n",
        product.unwrap_or("-")
    );
    let w = cs
        .iter()
        .map(|c| c.collection_name.len())
        .max()
        .unwrap_or(0)
        .max("COLLECTION".len());
    out.push_str(&format!(
        "{:<w$}  {:<8}  {:>8}  {:>6}  {:>8}  UPDATED\n",
        "COLLECTION", "STATUS", "EXPORTED", "SENT", "RECEIVED"
    ));
    for c in cs {
        out.push_str(&format!(
            "{:<w$}  {:<8}  {:>8}  {:>6}  {:>8}  {}\n",
            c.collection_name,
            c.status,
            opt(c.files_exported),
            opt(c.files_sent),
            c.files_received,
            c.updated_at
        ));
    }
    out
}

/// Runs `status`: exit 0 when found, 1 when unknown or on a database failure, 2 on usage.
pub fn status_main(args: &[String]) -> ExitCode {
    let rest = args
        .iter()
        .enumerate()
        .filter(|(i, a)| a.as_str() != "status" || is_status_command(&args[..*i]))
        .map(|(i, a)| {
            if i == 0 {
                "snapshot-status status".to_string()
            } else {
                a.clone()
            }
        });
    let parsed = match StatusArgs::try_parse_from(rest) {
        Ok(p) => p,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let opts = LoadOptions {
        config_dir: Some(parsed.config_dir.clone()),
        config_dir_explicit: args.iter().any(|a| a == "--config-dir")
            || std::env::var_os("STORAGETIER_CONFIG_DIR").is_some(),
        env_name: parsed.env.clone(),
        env_vars: None,
        overrides: Vec::new(),
    };
    let cfg = match load_config::<SnapshotStatus>(&opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("snapshot-status: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("snapshot-status: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let url = crate::database_url(&cfg);
    // A read-only command: never create an empty SQLite database by looking.
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        if !std::path::Path::new(path).exists() {
            eprintln!("snapshot-status: no database at {path} (nothing recorded yet?)");
            return ExitCode::from(EXIT_FAILURE);
        }
    }
    let result = rt.block_on(async {
        let store = Store::open(&url).await?;
        let cs = store.collections(&parsed.correlation_id).await?;
        let product = store.product_status(&parsed.correlation_id).await?;
        store.close().await;
        Ok::<_, crate::store::StoreError>((cs, product))
    });
    match result {
        Err(e) => {
            eprintln!("snapshot-status: database {}: {e}", db::redact_url(&url));
            ExitCode::from(EXIT_FAILURE)
        }
        Ok((cs, _)) if cs.is_empty() => {
            eprintln!(
                "snapshot-status: no collections for correlation id `{}`",
                parsed.correlation_id
            );
            ExitCode::from(EXIT_FAILURE)
        }
        Ok((cs, product)) => {
            if parsed.json {
                let doc = serde_json::json!({
                    "correlation_id": parsed.correlation_id,
                    "product_status": product,
                    "collections": cs,
                });
                println!("{doc}");
            } else {
                print!(
                    "{}",
                    render_table(&parsed.correlation_id, product.as_deref(), &cs)
                );
            }
            ExitCode::SUCCESS
        }
    }
}
