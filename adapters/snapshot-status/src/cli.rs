//! The `status <correlation-id>` operator command, a subcommand of the framework's CLI
//! (listed in `snapshot-status --help`).

use clap::{Args, FromArgMatches};
use framework::cli::Failure;
use framework::config::Config;

use crate::SnapshotStatusSettings;
use crate::store::{Collection, Store};

/// `snapshot-status status <correlation-id> [--json]` (plus the global `--config-dir`, `--env`).
#[derive(Args, Debug)]
#[command(about = "Print the collections and product status of a snapshot run")]
pub struct StatusArgs {
    /// One JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The snapshot run to show.
    pub correlation_id: String,
}

/// The `status` subcommand's definition, for [`framework::Service::extra_commands`].
pub fn status_command() -> clap::Command {
    StatusArgs::augment_args(clap::Command::new("status"))
}

/// Renders collections as a table.
/// Names come from bus messages: shown with control characters escaped, so none can move
/// the operator's cursor or forge a row.
pub fn render_table(correlation_id: &str, product: Option<&str>, cs: &[Collection]) -> String {
    use framework::dlq::printable;
    let opt = |v: Option<i64>| v.map_or("-".to_string(), |n| n.to_string());
    let mut out = format!(
        "correlation id: {}\nproduct status: {}\n",
        printable(correlation_id),
        printable(product.unwrap_or("-"))
    );
    let names: Vec<String> = cs.iter().map(|c| printable(&c.collection_name)).collect();
    let w = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
        .max("COLLECTION".len());
    out.push_str(&format!(
        "{:<w$}  {:<8}  {:>8}  {:>6}  {:>8}  UPDATED\n",
        "COLLECTION", "STATUS", "EXPORTED", "SENT", "RECEIVED"
    ));
    for (c, name) in cs.iter().zip(&names) {
        out.push_str(&format!(
            "{:<w$}  {:<8}  {:>8}  {:>6}  {:>8}  {}\n",
            name,
            printable(&c.status),
            opt(c.files_exported),
            opt(c.files_sent),
            c.files_received,
            c.updated_at
        ));
    }
    out
}

/// Renders collections as one JSON document (a line). Names come from bus messages:
/// the characters JSON leaves raw that a terminal acts on (U+009B, bidirectional
/// controls…) are written as escapes, the same JSON value.
pub fn render_json(correlation_id: &str, product: Option<&str>, cs: &[Collection]) -> String {
    let doc = serde_json::json!({
        "correlation_id": correlation_id,
        "product_status": product,
        "collections": cs,
    });
    format!(
        "{}\n",
        framework::telemetry::json_for_terminal(doc.to_string())
    )
}

/// Runs `status`: exit 0 when found, 1 when unknown or on a database failure, 2 on usage.
pub async fn status(
    args: &clap::ArgMatches,
    cfg: Config<SnapshotStatusSettings>,
) -> Result<(), Failure> {
    let parsed = StatusArgs::from_arg_matches(args).map_err(|e| Failure::Usage(e.to_string()))?;
    let url = crate::database_url(&cfg);
    // A read-only command: never create an empty SQLite database by looking.
    if let Some(path) = db::sqlite_file(&url)
        && !path.exists()
    {
        return Err(Failure::Other(format!(
            "no database at {} (nothing recorded yet?)",
            framework::dlq::printable(&path.to_string_lossy())
        )));
    }
    let found = async {
        let store = Store::open_read_only(&url).await?;
        let cs = store.collections(&parsed.correlation_id).await?;
        let product = store.product_status(&parsed.correlation_id).await?;
        // A database from before runs were pruned has no record of them: none was.
        let pruned = match cs.is_empty() {
            true => match store.was_pruned(&parsed.correlation_id).await {
                Err(e) if e.is_missing_table() => false,
                r => r?,
            },
            false => false,
        };
        store.close().await;
        Ok::<_, crate::store::StoreError>((cs, product, pruned))
    }
    .await;
    let (cs, product, pruned) = found.map_err(|e| match e.is_missing_table() {
        true => Failure::Other(format!(
            "database {} holds no snapshot-status records (nothing recorded yet? the service \
             makes its tables when it first starts)",
            db::redact_url(&url)
        )),
        false => Failure::Other(format!("database {}: {e}", db::redact_url(&url))),
    })?;
    // A run deleted past its keeping is told from one never seen: its messages are
    // dropped now, which an operator looking into those drops needs to know.
    if pruned {
        return Err(Failure::Other(format!(
            "run `{}` was deleted past its keeping ([snapshot_status] \
             keep_completed_runs_days or keep_idle_runs_days): its messages are now dropped",
            framework::dlq::printable(&parsed.correlation_id)
        )));
    }
    if cs.is_empty() {
        return Err(Failure::Other(format!(
            "no collections for correlation id `{}`",
            framework::dlq::printable(&parsed.correlation_id)
        )));
    }
    if parsed.json {
        framework::cli::print_out(&render_json(
            &parsed.correlation_id,
            product.as_deref(),
            &cs,
        ))
    } else {
        framework::cli::print_out(&render_table(
            &parsed.correlation_id,
            product.as_deref(),
            &cs,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_messages_cannot_forge_rows_or_reach_the_terminal() {
        let c = Collection {
            correlation_id: "c".into(),
            collection_name: "db.a\nforged  Success  9  9  9\u{1b}[2J".into(),
            status: "Received".into(),
            files_exported: Some(2),
            files_sent: None,
            files_received: 1,
            updated_at: "2026-01-01T00:00:00Z".into(),
            shutdown_flag: None,
            reprocess_files: None,
        };
        let table = render_table("c\r", Some("Pending"), &[c]);
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(
            !table.contains('\u{1b}') && !table.contains('\r'),
            "{table}"
        );
        assert!(table.contains("db.a\\nforged"), "{table}");
    }

    #[test]
    fn json_output_keeps_terminal_controls_escaped() {
        let c = Collection {
            correlation_id: "c".into(),
            collection_name: "db.a\u{9b}2J\u{202e}b\u{2028}".into(),
            status: "Received".into(),
            files_exported: None,
            files_sent: None,
            files_received: 0,
            updated_at: "2026-01-01T00:00:00Z".into(),
            shutdown_flag: None,
            reprocess_files: None,
        };
        let out = render_json("c\u{9b}", None, std::slice::from_ref(&c));
        assert!(!out.contains(['\u{9b}', '\u{202e}', '\u{2028}']), "{out:?}");
        let back: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(back["collections"][0]["collection_name"], c.collection_name);
        assert_eq!(back["correlation_id"], "c\u{9b}");
    }
}
