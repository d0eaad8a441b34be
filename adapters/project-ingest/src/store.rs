//! The project/commission tables: single-statement upserts guarded by the event order.

use db::{AnyPool, Row};
use serde::Serialize;

use crate::event::{CommissionDeletion, EventKind, ProjectEvent};

/// Migrations embedded in the binary.
pub static MIGRATOR: db::Migrator = db::sqlx::migrate!("./migrations");

/// Database failures (all transient for a message): the shared database error.
pub type StoreError = db::DbError;

/// A project row as stored (the success message body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredProject {
    /// Pluto project id.
    pub id: String,
    /// Title.
    pub title: String,
    /// Status.
    pub status: String,
    /// Commission id; None: the project has no commission.
    pub commission_id: Option<String>,
    /// Commission title; None while no event has given it (pluto-core entries do not).
    pub commission_title: Option<String>,
    /// Production office.
    pub production_office: String,
    /// Creation time as Pluto sent it.
    pub created: String,
    /// Ordering key of the event that wrote this state.
    pub version: Option<String>,
    /// `project-created` or `project-updated`: the event that wrote this state.
    pub last_event: String,
    /// When this service stored it (RFC 3339).
    pub updated_at: String,
}

/// What applying an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The project now holds the event's data.
    Stored(Box<StoredProject>),
    /// A newer state was already stored; nothing changed.
    Stale,
    /// project-updated for a project never seen.
    Missing,
    /// The event's commission was deleted by a newer message: the event is stale. Where
    /// it would have put the project in that commission before the deletion (the row no
    /// newer than it), the project is deleted too, as the deletion would have taken it.
    Deleted(Box<DeletedCommission>),
}

/// What deleting a commission did (the success message body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeletedCommission {
    /// Pluto commission id.
    pub commission_id: String,
    /// Whether its row was deleted now (false: unknown here, deleted before, or newer
    /// than the deletion).
    pub commission_deleted: bool,
    /// The projects of it deleted now, by id (none stored, or all newer than the deletion:
    /// kept).
    pub deleted_projects: Vec<String>,
    /// Always `commission-deleted`: what wrote this state, as a project's `lastEvent`.
    pub last_event: &'static str,
    /// When this service deleted it (RFC 3339).
    pub updated_at: String,
}

/// Serialises the writes of commission `id` on PostgreSQL until the transaction ends: a
/// project event checks the commission's deletion and then writes, and a deletion
/// committed in between (another replica's) would miss the project it is writing. Taken
/// before any row lock, by every writer of a commission. SQLite runs one writing
/// transaction at a time already.
async fn lock_commission(tx: &mut db::WriteTx, id: &str) -> Result<(), db::sqlx::Error> {
    if tx.backend_name().eq_ignore_ascii_case("postgresql") {
        db::sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("storagetier project-ingest commission {id}"))
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Notes that project `id` was deleted with `commission` by the deletion of key
/// `deletion` (version, tie), its row then of key `row`.
/// `by_event`: the key of the event (delivered after the deletion) that deleted the row
/// ([`event_key`]), None where the deletion did. Where `only_newer`, an earlier note of
/// the project is replaced only by a newer state (`row`): an older event delivered after
/// the deletion, which deleted nothing, notes the project's newest state in the commission.
#[allow(clippy::too_many_arguments)]
async fn note_deleted_project(
    tx: &mut db::WriteTx,
    id: &str,
    commission: &str,
    deletion: (Option<&str>, Option<&str>),
    row: (Option<&str>, Option<&str>),
    now: &str,
    by_event: Option<String>,
    only_newer: bool,
) -> Result<(), db::sqlx::Error> {
    let condition = if only_newer {
        format!(
            " WHERE deleted_projects.row_version IS NULL OR {}",
            no_newer(
                (
                    "deleted_projects.row_version",
                    "deleted_projects.row_version_tie"
                ),
                ("excluded.row_version", "excluded.row_version_tie"),
            )
        )
    } else {
        String::new()
    };
    db::sqlx::query(&format!(
        "INSERT INTO deleted_projects (id, commission_id, version, version_tie, row_version, \
         row_version_tie, deleted_at, deleted_by_event) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (id) DO UPDATE SET commission_id = excluded.commission_id, \
         version = excluded.version, version_tie = excluded.version_tie, \
         row_version = excluded.row_version, row_version_tie = excluded.row_version_tie, \
         deleted_at = excluded.deleted_at, \
         deleted_by_event = COALESCE(excluded.deleted_by_event, deleted_projects.deleted_by_event)\
         {condition}"
    ))
    .bind(id)
    .bind(commission)
    .bind(deletion.0.map(str::to_string))
    .bind(deletion.1.map(str::to_string))
    .bind(row.0.map(str::to_string))
    .bind(row.1.map(str::to_string))
    .bind(now)
    .bind(by_event)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// An event's ordering key and tie as one text (`deleted_projects.deleted_by_event`).
fn event_key(ev: &ProjectEvent) -> String {
    format!(
        "{} {}",
        ev.version.as_deref().unwrap_or_default(),
        ev.tie.as_deref().unwrap_or_default()
    )
}

/// The row of a project-updated event `ev` whose project was deleted with its commission
/// while the event — newer than the deleted row, naming another commission — had moved it
/// out before the deletion (the move delivered after it: a retry tier, another replica):
/// the project lives on in Pluto, so it is stored again from the event (which carries
/// every field) instead of waiting as missing and being dropped with every later update.
/// None where that is not so.
async fn moved_out_before_deletion(
    tx: &mut db::WriteTx,
    ev: &ProjectEvent,
    now: &str,
) -> Result<Option<db::sqlx::any::AnyRow>, db::sqlx::Error> {
    let Some(version) = &ev.version else {
        return Ok(None);
    };
    let newer = no_newer(("row_version", "row_version_tie"), ("$2", "$3"));
    let moved = db::sqlx::query(&format!(
        "SELECT commission_id FROM deleted_projects WHERE id = $1 \
         AND (row_version IS NULL OR {newer}) \
         AND ($4 IS NULL OR commission_id <> $4)"
    ))
    .bind(&ev.id)
    .bind(version)
    .bind(ev.tie.clone())
    .bind(ev.commission_id.clone())
    .fetch_optional(&mut **tx)
    .await?;
    if moved.is_none() {
        return Ok(None);
    }
    db::sqlx::query("DELETE FROM deleted_projects WHERE id = $1")
        .bind(&ev.id)
        .execute(&mut **tx)
        .await?;
    let sql = format!(
        "INSERT INTO projects ({COLS}, version_tie) VALUES ($1, $2, $3, $4, {COMMISSION_TITLE}, \
         $6, $7, $8, 'project-updated', $9, $10) ON CONFLICT (id) DO NOTHING RETURNING {COLS}"
    );
    db::sqlx::query(&sql)
        .bind(&ev.id)
        .bind(&ev.title)
        .bind(&ev.status)
        .bind(ev.commission_id.clone())
        .bind(ev.commission_title.clone())
        .bind(&ev.production_office)
        .bind(&ev.created)
        .bind(ev.version.clone())
        .bind(now)
        .bind(ev.tie.clone())
        .fetch_optional(&mut **tx)
        .await
}

/// The project database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
}

/// The project's commission title (`$5`, the event's) in a write whose commission id is
/// `$4`: an event without one (a pluto-core entry) keeps the title stored for that
/// commission, none if it has none or the project has no commission.
const COMMISSION_TITLE: &str = "COALESCE($5, (SELECT c.title FROM commissions c WHERE c.id = $4))";

/// `stored` (a row's `version`, `version_tie`) is no newer than `new` (an event's): an
/// older time, or the same time and a tie no later (none sorts first).
fn no_newer(stored: (&str, &str), new: (&str, &str)) -> String {
    let ((sv, st), (nv, nt)) = (stored, new);
    format!("({sv} < {nv} OR ({sv} = {nv} AND COALESCE({st}, '') <= COALESCE({nt}, '')))")
}

const COLS: &str = "id, title, status, commission_id, commission_title, production_office, \
                    created, version, last_event, updated_at";

fn row_to_project(r: &db::sqlx::any::AnyRow) -> Result<StoredProject, db::sqlx::Error> {
    Ok(StoredProject {
        id: r.try_get("id")?,
        title: r.try_get("title")?,
        status: r.try_get("status")?,
        commission_id: r.try_get("commission_id")?,
        commission_title: r.try_get("commission_title")?,
        production_office: r.try_get("production_office")?,
        created: r.try_get("created")?,
        version: r.try_get("version")?,
        last_event: r.try_get("last_event")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl Store {
    /// Opens (and migrates) the database at `url`.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            pool: db::connect(url, &MIGRATOR).await?,
        })
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// One project by id.
    pub async fn project(&self, id: &str) -> Result<Option<StoredProject>, StoreError> {
        let sql = format!("SELECT {COLS} FROM projects WHERE id = $1");
        let row = db::sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(row_to_project).transpose()?)
    }

    /// When the message with digest `message` first reached the service, if noted.
    pub async fn first_receipt(&self, message: &str) -> Result<Option<String>, StoreError> {
        let row = db::sqlx::query("SELECT received FROM receipts WHERE message = $1")
            .bind(message)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("received")).transpose()?)
    }

    /// Notes that the message with digest `message` was received at `received` (an
    /// ordering key), replacing an earlier note of an identical message.
    pub async fn note_receipt(&self, message: &str, received: &str) -> Result<(), StoreError> {
        db::sqlx::query(
            "INSERT INTO receipts (message, received) VALUES ($1, $2) \
             ON CONFLICT (message) DO UPDATE SET received = excluded.received",
        )
        .bind(message)
        .bind(received)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets receipts noted before `before` (an ordering key); returns how many.
    pub async fn prune_receipts(&self, before: &str) -> Result<u64, StoreError> {
        Ok(db::delete_in_batches(&self.pool, "receipts", "message", "received", before).await?)
    }

    /// A commission's (title, production office).
    pub async fn commission(&self, id: &str) -> Result<Option<(String, String)>, StoreError> {
        let row = db::sqlx::query("SELECT title, production_office FROM commissions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some((r.try_get("title")?, r.try_get("production_office")?)),
            None => None,
        })
    }

    /// Applies an event atomically: the project write and the commission upsert commit together.
    pub async fn apply(&self, ev: &ProjectEvent) -> Result<Applied, StoreError> {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        // A stored key further ahead than any event's may be (an earlier release kept a
        // producer's future clock) is no newer state: any event replaces it.
        let bound = crate::event::stored_beyond_belief();
        let mut created_key: Option<String> = None;
        let mut tx = db::begin_write(&self.pool).await?;
        if let Some(commission) = &ev.commission_id {
            lock_commission(&mut tx, commission).await?;
            // An event its commission's deletion came after (a retry, a redelivery, a
            // replay of an older message) would bring back what Pluto deleted.
            if let Some(version) = &ev.version {
                let newer = no_newer(("version", "version_tie"), ("$2", "$3"));
                let deleted = db::sqlx::query(&format!(
                    "SELECT version, version_tie FROM deleted_commissions WHERE id = $1 \
                     AND version IS NOT NULL AND NOT ({newer}) AND version <= $4"
                ))
                .bind(commission)
                .bind(version)
                .bind(ev.tie.clone())
                .bind(&bound)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(t) = deleted {
                    let (t_version, t_tie): (Option<String>, Option<String>) =
                        (t.try_get("version")?, t.try_get("version_tie")?);
                    // The row this event would have overwritten (the same rules as below:
                    // a create only over its creation's row) is no newer than the deletion.
                    let over = match ev.kind {
                        EventKind::Created => format!(
                            "last_event = 'project-created' AND (version IS NULL OR {})",
                            no_newer(("version", "version_tie"), ("$2", "$3"))
                        ),
                        EventKind::Updated => format!(
                            "(last_event = 'project-created' OR version IS NULL OR {} \
                             OR version > $4)",
                            no_newer(("version", "version_tie"), ("$2", "$3"))
                        ),
                    };
                    let gone = db::sqlx::query(&format!(
                        "DELETE FROM projects WHERE id = $1 AND {over} RETURNING id"
                    ))
                    .bind(&ev.id)
                    .bind(version)
                    .bind(ev.tie.clone())
                    .bind(&bound)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
                    let deletion = (t_version.as_deref(), t_tie.as_deref());
                    let row = (ev.version.as_deref(), ev.tie.as_deref());
                    let deleted_now = if gone {
                        let by = Some(event_key(ev));
                        note_deleted_project(
                            &mut tx, &ev.id, commission, deletion, row, &now, by, false,
                        )
                        .await?;
                        true
                    } else {
                        let noted = db::sqlx::query(
                            "SELECT deleted_by_event FROM deleted_projects \
                             WHERE id = $1 AND commission_id = $2",
                        )
                        .bind(&ev.id)
                        .bind(commission)
                        .fetch_optional(&mut *tx)
                        .await?
                        .map(|r| r.try_get::<Option<String>, _>("deleted_by_event"))
                        .transpose()?
                        .flatten();
                        let stored = db::sqlx::query("SELECT id FROM projects WHERE id = $1")
                            .bind(&ev.id)
                            .fetch_optional(&mut *tx)
                            .await?
                            .is_some();
                        // Not stored: the project's newest state known in the commission
                        // before its deletion is noted, so an older move out of it
                        // delivered later does not bring it back; of a create, that it
                        // lived in the commission, so a move out of it waiting for it (it
                        // overtook the create) is stored. Not of an update of a project
                        // never seen here: noted, it was stored by a later move out ("moved
                        // out before the deletion") from an update alone.
                        let note = !stored
                            && (matches!(ev.kind, EventKind::Created)
                                || db::sqlx::query(
                                    "SELECT id FROM deleted_projects WHERE id = $1",
                                )
                                .bind(&ev.id)
                                .fetch_optional(&mut *tx)
                                .await?
                                .is_some());
                        if note {
                            note_deleted_project(
                                &mut tx, &ev.id, commission, deletion, row, &now, None, true,
                            )
                            .await?;
                        }
                        // This very event deleted it at an earlier attempt: said again.
                        noted.as_deref() == Some(event_key(ev).as_str())
                    };
                    tx.commit().await?;
                    return Ok(Applied::Deleted(Box::new(DeletedCommission {
                        commission_id: commission.clone(),
                        commission_deleted: false,
                        deleted_projects: if deleted_now {
                            vec![ev.id.clone()]
                        } else {
                            Vec::new()
                        },
                        last_event: "commission-deleted",
                        updated_at: now,
                    })));
                }
                // The deletion took the row a creation wrote whatever its key (a
                // commission is deleted after its projects were created, whichever clocks
                // keyed them): that create, or an older one, handled again (a redelivery,
                // a retry tier, a replay) is the deletion's as above, not stored again
                // with its commission. A newer create (the project created again) is not.
                if matches!(ev.kind, EventKind::Created) {
                    let no_older = no_newer(
                        ("$3", "$4"),
                        (
                            "deleted_projects.row_version",
                            "deleted_projects.row_version_tie",
                        ),
                    );
                    let taken = db::sqlx::query(&format!(
                        "SELECT deleted_projects.id FROM deleted_projects \
                         WHERE deleted_projects.id = $1 AND deleted_projects.commission_id = $2 \
                         AND deleted_projects.row_version IS NOT NULL \
                         AND deleted_projects.row_version <= $5 AND {no_older} \
                         AND EXISTS (SELECT 1 FROM deleted_commissions WHERE deleted_commissions.id = $2)"
                    ))
                    .bind(&ev.id)
                    .bind(commission)
                    .bind(version)
                    .bind(ev.tie.clone())
                    .bind(&bound)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
                    if taken {
                        tx.rollback().await?;
                        return Ok(Applied::Deleted(Box::new(DeletedCommission {
                            commission_id: commission.clone(),
                            commission_deleted: false,
                            deleted_projects: Vec::new(),
                            last_event: "commission-deleted",
                            updated_at: now,
                        })));
                    }
                }
            }
        }
        let row = match (&ev.kind, &ev.version) {
            (EventKind::Created, _) => {
                // A created event never overwrites state written by an update, and never
                // a newer created event (redelivery of the same one re-applies it).
                let newer = no_newer(
                    ("projects.version", "projects.version_tie"),
                    ("excluded.version", "excluded.version_tie"),
                );
                let sql = format!(
                    "INSERT INTO projects ({COLS}, version_tie) VALUES ($1, $2, $3, $4, {COMMISSION_TITLE}, $6, $7, $8, $9, $10, $12) \
                     ON CONFLICT (id) DO UPDATE SET title = excluded.title, status = excluded.status, \
                     commission_id = excluded.commission_id, commission_title = excluded.commission_title, \
                     production_office = excluded.production_office, created = excluded.created, \
                     version = excluded.version, version_tie = excluded.version_tie, \
                     last_event = excluded.last_event, updated_at = excluded.updated_at \
                     WHERE projects.last_event = 'project-created' AND (projects.version IS NULL \
                     OR excluded.version IS NULL OR {newer} \
                     OR projects.version > $11) \
                     RETURNING {COLS}"
                );
                db::sqlx::query(&sql)
                    .bind(&ev.id)
                    .bind(&ev.title)
                    .bind(&ev.status)
                    .bind(ev.commission_id.clone())
                    .bind(ev.commission_title.clone())
                    .bind(&ev.production_office)
                    .bind(&ev.created)
                    .bind(ev.version.clone())
                    .bind(ev.kind.as_str())
                    .bind(&now)
                    .bind(&bound)
                    .bind(ev.tie.clone())
                    .fetch_optional(&mut *tx)
                    .await?
            }
            (EventKind::Updated, version) => 'updated: {
                // The project's row, locked on PostgreSQL (SQLite writes one transaction
                // at a time) until this update commits. Without the lock a create
                // committed between this read and the update (another replica's) was
                // missed by the update and seen by the check after it: the update was
                // dropped as stale against the older state that create had just written.
                let lock = if tx.backend_name().eq_ignore_ascii_case("postgresql") {
                    " FOR UPDATE"
                } else {
                    ""
                };
                let Some(current) = db::sqlx::query(&format!(
                    "SELECT version, last_event FROM projects WHERE id = $1{lock}"
                ))
                .bind(&ev.id)
                .fetch_optional(&mut *tx)
                .await?
                else {
                    if let Some(row) = moved_out_before_deletion(&mut tx, ev, &now).await? {
                        break 'updated Some(row);
                    }
                    tx.rollback().await?;
                    return Ok(Applied::Missing);
                };
                // The key the project's creation left, while no update has replaced it:
                // the commission that creation wrote yields to this update the same way.
                if current.try_get::<String, _>("last_event")? == "project-created" {
                    created_key = current.try_get("version")?;
                }
                let (set_version, now_param, guard) = match version {
                    // Any update is newer than the project's creation: over a row its
                    // created event wrote, it applies whatever the keys say (a created
                    // key is Pluto's clock, a plain update's this replica's: a clock
                    // behind Pluto's dropped the first updates as stale).
                    Some(_) => (
                        "$8, version_tie = $11",
                        "$9",
                        format!(
                            " AND (last_event = 'project-created' OR version IS NULL \
                             OR {} OR version > $10)",
                            no_newer(("version", "version_tie"), ("$8", "$11"))
                        ),
                    ),
                    None => ("version", "$8", String::new()),
                };
                let sql = format!(
                    "UPDATE projects SET title = $2, status = $3, commission_id = $4, \
                     commission_title = {COMMISSION_TITLE}, production_office = $6, created = $7, \
                     version = {set_version}, last_event = 'project-updated', updated_at = {now_param} \
                     WHERE id = $1{guard} RETURNING {COLS}"
                );
                let mut q = db::sqlx::query(&sql)
                    .bind(&ev.id)
                    .bind(&ev.title)
                    .bind(&ev.status)
                    .bind(ev.commission_id.clone())
                    .bind(ev.commission_title.clone())
                    .bind(&ev.production_office)
                    .bind(&ev.created);
                if let Some(v) = version {
                    q = q.bind(v.clone());
                }
                q = q.bind(&now);
                if version.is_some() {
                    q = q.bind(&bound).bind(ev.tie.clone());
                }
                q.fetch_optional(&mut *tx).await?
            }
        };
        let Some(row) = row else {
            let exists = db::sqlx::query("SELECT id FROM projects WHERE id = $1")
                .bind(&ev.id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            tx.rollback().await?;
            return Ok(if exists {
                Applied::Stale
            } else {
                Applied::Missing
            });
        };
        let project = row_to_project(&row)?;
        // Only an event that names the commission's title writes the commission: a row
        // needs one, and an event without it says nothing about the commission itself.
        if let (Some(id), Some(title)) = (&ev.commission_id, &ev.commission_title) {
            let newer = no_newer(
                ("commissions.version", "commissions.version_tie"),
                ("excluded.version", "excluded.version_tie"),
            );
            db::sqlx::query(&format!(
                "INSERT INTO commissions (id, title, production_office, version, version_tie, updated_at) \
                 VALUES ($1, $2, $3, $4, $8, $5) ON CONFLICT (id) DO UPDATE SET title = excluded.title, \
                 production_office = excluded.production_office, \
                 version = COALESCE(excluded.version, commissions.version), \
                 version_tie = CASE WHEN excluded.version IS NULL THEN commissions.version_tie \
                 ELSE excluded.version_tie END, updated_at = excluded.updated_at \
                 WHERE commissions.version IS NULL OR excluded.version IS NULL \
                 OR {newer} OR commissions.version > $6 \
                 OR commissions.version = $7",
            ))
            .bind(id)
            .bind(title)
            .bind(&ev.production_office)
            .bind(ev.version.clone())
            .bind(&now)
            .bind(&bound)
            .bind(created_key)
            .bind(ev.tie.clone())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Applied::Stored(Box::new(project)))
    }
}

impl Store {
    /// Deletes commission `d.commission_id` and its projects stored no later than the
    /// deletion (its ordering key) or written by their creation (a commission is deleted
    /// after its projects were created, whatever clocks keyed them), and keeps the
    /// deletion, so an older event of them is stale from then on. Applied again (a retry
    /// or redelivery of the same deletion), it deletes nothing more and says what it
    /// deleted the first time.
    pub async fn delete_commission(
        &self,
        d: &CommissionDeletion,
    ) -> Result<DeletedCommission, StoreError> {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let bound = crate::event::stored_beyond_belief();
        let id = &d.commission_id;
        let key = (d.version.as_deref(), d.tie.as_deref());
        let mut tx = db::begin_write(&self.pool).await?;
        lock_commission(&mut tx, id).await?;
        // When this same deletion (its key recorded), or a newer one of the commission, was
        // applied; and what this same one did.
        let covered = no_newer(("$2", "$3"), ("version", "version_tie"));
        let (applied_at, before): (Option<String>, Option<Outcome>) = db::sqlx::query(&format!(
            "SELECT version, version_tie, deleted_at, result, \
             CASE WHEN version IS NOT NULL AND $2 IS NOT NULL AND version <= $4 AND {covered} \
             THEN deleted_at END AS covered_at FROM deleted_commissions WHERE id = $1"
        ))
        .bind(id)
        .bind(d.version.clone())
        .bind(d.tie.clone())
        .bind(&bound)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| -> Result<_, db::sqlx::Error> {
            let (v, t, at, result): (Option<String>, Option<String>, String, Option<String>) = (
                r.try_get("version")?,
                r.try_get("version_tie")?,
                r.try_get("deleted_at")?,
                r.try_get("result")?,
            );
            let covered_at: Option<String> = r.try_get("covered_at")?;
            Ok(match (v.as_deref(), t.as_deref()) == key {
                true => (Some(at), result.and_then(|j| serde_json::from_str(&j).ok())),
                false => (covered_at, None),
            })
        })
        .transpose()?
        .unwrap_or_default();
        // What a newer event wrote (a project created again after the deletion) stays.
        let older = |table: &str| {
            format!(
                "({table}.version IS NULL OR $2 IS NULL OR {} OR {table}.version > $4)",
                no_newer(
                    (&format!("{table}.version"), &format!("{table}.version_tie")),
                    ("$2", "$3")
                )
            )
        };
        // Applied again (a redelivery, a retry, a replay), or after a newer deletion of the
        // commission, it takes nothing written since that was applied: an event older than
        // a kept deletion is refused, so whatever was written since is newer, whatever its
        // key (a project created again). Before, a repeat deleted every project created
        // since, and the commission with them.
        let unchanged_since = |table: &str| format!("($5 IS NULL OR {table}.updated_at <= $5)");
        let rows = db::sqlx::query(&format!(
            "DELETE FROM projects WHERE commission_id = $1 AND ({} \
             OR projects.last_event = 'project-created') AND {} \
             RETURNING id, version, version_tie",
            older("projects"),
            unchanged_since("projects")
        ))
        .bind(id)
        .bind(d.version.clone())
        .bind(d.tie.clone())
        .bind(&bound)
        .bind(applied_at.clone())
        .fetch_all(&mut *tx)
        .await?;
        let mut deleted_projects = Vec::new();
        for r in &rows {
            let (p, v, t): (String, Option<String>, Option<String>) = (
                r.try_get("id")?,
                r.try_get("version")?,
                r.try_get("version_tie")?,
            );
            let row = (v.as_deref(), t.as_deref());
            note_deleted_project(&mut tx, &p, id, key, row, &now, None, false).await?;
            deleted_projects.push(p);
        }
        // The commission too, unless a newer event wrote it and a project of it remains.
        let commission = db::sqlx::query(&format!(
            "DELETE FROM commissions WHERE id = $1 AND ({} OR NOT EXISTS \
             (SELECT 1 FROM projects WHERE projects.commission_id = $1)) AND {}",
            older("commissions"),
            unchanged_since("commissions")
        ))
        .bind(id)
        .bind(d.version.clone())
        .bind(d.tie.clone())
        .bind(&bound)
        .bind(applied_at.clone())
        .execute(&mut *tx)
        .await?;
        let mut done = before.unwrap_or_default();
        done.commission_deleted |= commission.rows_affected() > 0;
        done.deleted_projects.extend(deleted_projects);
        done.deleted_projects.sort();
        done.deleted_projects.dedup();
        // The newest deletion's key is kept (a replay of an older one does not move it
        // back), a key further ahead than any believable replaced as a row's is; with
        // it, what it deleted.
        let result = serde_json::to_string(&done).unwrap_or_default();
        let newer = no_newer(
            (
                "deleted_commissions.version",
                "deleted_commissions.version_tie",
            ),
            ("excluded.version", "excluded.version_tie"),
        );
        db::sqlx::query(&format!(
            "INSERT INTO deleted_commissions (id, version, version_tie, deleted_at, result) \
             VALUES ($1, $2, $3, $4, $6) ON CONFLICT (id) DO UPDATE SET version = excluded.version, \
             version_tie = excluded.version_tie, \
             deleted_at = COALESCE($7, excluded.deleted_at), result = excluded.result \
             WHERE deleted_commissions.version IS NULL OR excluded.version IS NULL \
             OR {newer} OR deleted_commissions.version > $5"
        ))
        .bind(id)
        .bind(d.version.clone())
        .bind(d.tie.clone())
        .bind(&now)
        .bind(&bound)
        .bind(result)
        // A repeat keeps when it was first applied: what it must not take is counted from then.
        .bind(applied_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(DeletedCommission {
            commission_id: id.clone(),
            commission_deleted: done.commission_deleted,
            deleted_projects: done.deleted_projects,
            last_event: "commission-deleted",
            updated_at: now,
        })
    }
}

/// What one deletion deleted, kept with it (`deleted_commissions.result`).
#[derive(Debug, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Outcome {
    commission_deleted: bool,
    deleted_projects: Vec<String>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::event::{CommissionDeletion, EventKind, ProjectEvent};

    fn event(kind: EventKind, title: &str, version: &str) -> ProjectEvent {
        ProjectEvent {
            kind,
            id: "p".into(),
            title: title.into(),
            status: "New".into(),
            commission_id: Some("c".into()),
            commission_title: Some(format!("{title} commission")),
            production_office: "UK".into(),
            created: "2026-01-01T00:00:00.000Z".into(),
            version: Some(version.into()),
            tie: None,
        }
    }

    /// Ties order alike whatever the database's collation: on a PostgreSQL column collated
    /// as ICU's en-US (symbols weigh less than digits there, where bytes put `~` after
    /// them; `en_US.UTF-8` of libc weighs no punctuation at all), a Kinesis record whose tie is its sequence number is applied over a
    /// row an earlier release stored with a time as the tie of that arrival time, and an
    /// older sequence number after a newer one is stale.
    #[tokio::test]
    async fn sequence_ties_order_as_bytes_under_a_locale_collation() {
        use base64::Engine;
        let pg = db::testing::TempPostgres::create().await.expect("postgres");
        let store = Store::open(&pg.url).await.expect("open");
        db::sqlx::query(
            r#"ALTER TABLE projects ALTER COLUMN version_tie TYPE text COLLATE "en-US-x-icu""#,
        )
        .execute(&store.pool)
        .await
        .expect("a locale's collation (PostgreSQL built with ICU)");
        let record = |title: &str, seq: &str| {
            let mut p = serde_json::json!({"type": "project-updated", "id": "p",
                "title": title, "status": "New", "commissionId": "c",
                "commissionTitle": "c", "productionOffice": "UK",
                "created": "2017-04-24T17:20:11.503Z"});
            p["updated"] = serde_json::json!("2026-01-01T00:00:00Z");
            let data = base64::engine::general_purpose::STANDARD.encode(p.to_string());
            let rec = serde_json::json!({"kinesis": {"data": data, "sequenceNumber": seq,
                "approximateArrivalTimestamp": 1_545_084_650.987}});
            match crate::event::items(&rec, "2026-01-02T00:00:00.000000Z")
                .remove(0)
                .parsed
            {
                Ok(crate::event::Parsed::Project(e)) => e,
                other => panic!("{other:?}"),
            }
        };
        let newer = record("newer", "49590000000000000000000000011");
        let created = event(EventKind::Created, "created", "2025-01-01T00:00:00.000000Z");
        store.apply(&created).await.expect("created");
        // An update over a created row applies whatever its key: the row an update wrote.
        let mut stored = event(EventKind::Updated, "stored", "2026-01-01T00:00:00.000000Z");
        // What an earlier release stored for a record of that arrival time: a time.
        stored.tie = Some(format!(
            "{} 2026-01-02T00:00:00.000000Z",
            newer
                .tie
                .as_deref()
                .and_then(|t| t.split(' ').next())
                .expect("tie")
        ));
        store.apply(&stored).await.expect("stored");
        assert!(matches!(
            store.apply(&newer).await.expect("applied"),
            Applied::Stored(_)
        ));
        let older = record("older", "4959000000000000000000000009");
        assert!(matches!(
            store.apply(&older).await.expect("applied"),
            Applied::Stale
        ));
        let p = store.project("p").await.expect("read").expect("there");
        assert_eq!(p.title, "newer");
        pg.drop_db().await.expect("drop");
    }

    /// Receipts older than the cut are forgotten, newer ones kept (a table that only grew,
    /// a row per unstamped message).
    #[tokio::test]
    async fn old_receipts_are_forgotten_and_recent_ones_kept() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("p.db").display());
        let store = Store::open(&url).await.expect("open");
        let times = [
            "2026-01-01T00:00:00.000000Z",
            "2026-02-01T00:00:00.000000Z",
            "2026-03-01T00:00:00.000000Z",
        ];
        for (i, t) in times.iter().enumerate() {
            store
                .note_receipt(&format!("m{i}"), t)
                .await
                .expect("noted");
        }
        let n = store
            .prune_receipts("2026-02-01T00:00:00.000000Z")
            .await
            .expect("pruned");
        assert_eq!(n, 1);
        assert_eq!(store.first_receipt("m0").await.expect("read"), None);
        for (i, t) in times.iter().enumerate().skip(1) {
            let kept = store.first_receipt(&format!("m{i}")).await.expect("read");
            assert_eq!(kept.as_deref(), Some(*t));
        }
    }

    /// A store on a fresh PostgreSQL database whose writes to `projects` (`when`: a
    /// trigger's timing) by statements starting `sql` wait until the returned transaction
    /// ends (see `db::testing::hold_writes`).
    async fn store_holding(
        when: &str,
        sql: &str,
    ) -> (
        db::testing::TempPostgres,
        Store,
        db::sqlx::Transaction<'static, db::sqlx::Any>,
    ) {
        let pg = db::testing::TempPostgres::create().await.expect("postgres");
        let store = Store::open(&pg.url).await.expect("open");
        let condition = format!("current_query() LIKE '{sql}%'");
        let holder =
            db::testing::hold_writes(&store.pool, "projects", when, "STATEMENT", &condition)
                .await
                .expect("hold");
        (pg, store, holder)
    }

    /// Waits until `task` ended or `n` sessions of `store`'s database wait for a lock.
    async fn until_waiting<T>(
        store: &Store,
        task: &tokio::task::JoinHandle<T>,
        n: i64,
        what: &str,
    ) {
        framework::testing::within(LIMIT, what, async {
            while !task.is_finished()
                && db::testing::sessions_waiting(&store.pool)
                    .await
                    .expect("locks")
                    < n
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    const LIMIT: Duration = Duration::from_secs(60);

    /// On PostgreSQL an update racing its project's create (another replica's, committed
    /// while the update runs: here after the update's statement began, which a trigger
    /// holds on a lock this test holds) is applied, or retried as missing when the create
    /// had not committed when it looked — never dropped as stale against the older state
    /// the create wrote. Before, the update missed the row
    /// and the check after it saw it: "stale", and the project kept its create's title.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_update_racing_its_create_is_never_stale_against_it() {
        let (pg, store, holder) = store_holding("BEFORE UPDATE", "UPDATE projects").await;
        let update = event(EventKind::Updated, "updated", "2026-01-02T00:00:00.000000Z");
        let updating = tokio::spawn({
            let (store, update) = (store.clone(), update.clone());
            async move { store.apply(&update).await }
        });
        until_waiting(&store, &updating, 1, "the update to wait or end").await;
        let create = event(EventKind::Created, "created", "2026-01-01T00:00:00.000000Z");
        assert!(matches!(
            store.apply(&create).await.expect("create"),
            Applied::Stored(_)
        ));
        holder.commit().await.expect("release");
        let first = framework::testing::within(LIMIT, "the update", updating).await;
        match first.expect("join").expect("update") {
            Applied::Stored(_) => {}
            // Retried as the service does, now that its create is there.
            Applied::Missing => assert!(matches!(
                store.apply(&update).await.expect("update again"),
                Applied::Stored(_)
            )),
            Applied::Stale | Applied::Deleted(_) => {
                panic!("the update was dropped as stale against its create")
            }
        }
        let stored = store.project("p").await.expect("read").expect("project");
        assert_eq!(stored.title, "updated");
        store.close().await;
        pg.drop_db().await.expect("drop");
    }

    /// On PostgreSQL a create of a commission's project older than the commission's
    /// deletion (another replica's), past its look for the deletion and still writing when
    /// the deletion runs (held there by a trigger on a lock this test holds), is deleted
    /// with the rest once it commits. Without the commission's lock the deletion missed the
    /// row being written and the project outlived its commission.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_create_racing_its_commissions_deletion_does_not_outlive_it() {
        let (pg, store, holder) = store_holding("BEFORE INSERT", "INSERT INTO projects").await;
        let create = event(EventKind::Created, "created", "2026-01-01T00:00:00.000000Z");
        let creating = tokio::spawn({
            let store = store.clone();
            async move { store.apply(&create).await }
        });
        until_waiting(&store, &creating, 1, "the create to wait").await;
        let deletion = CommissionDeletion {
            commission_id: "c".into(),
            version: Some("2026-01-02T00:00:00.000000Z".into()),
            tie: None,
        };
        let deleting = tokio::spawn({
            let store = store.clone();
            async move { store.delete_commission(&deletion).await }
        });
        until_waiting(&store, &deleting, 2, "the deletion to wait or end").await;
        holder.commit().await.expect("release");
        let created = framework::testing::within(LIMIT, "the create", creating).await;
        assert!(matches!(
            created.expect("join").expect("create"),
            Applied::Stored(_)
        ));
        let deleted = framework::testing::within(LIMIT, "the deletion", deleting)
            .await
            .expect("join")
            .expect("deletion");
        assert_eq!(deleted.deleted_projects, vec!["p".to_string()]);
        assert!(store.project("p").await.expect("read").is_none());
        assert!(store.commission("c").await.expect("read").is_none());
        store.close().await;
        pg.drop_db().await.expect("drop");
    }

    /// An update that moved a project into a commission before the commission's deletion,
    /// delivered after it, deletes the project; applied again (its batch retried, a
    /// redelivery), it says so again — before, the retry's success, the only one published,
    /// said nothing was deleted.
    #[tokio::test]
    async fn a_move_into_a_deleted_commission_applied_again_says_it_deleted() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("p.db").display());
        let store = Store::open(&url).await.expect("open");
        let mut create = event(EventKind::Created, "p", "2026-01-01T00:00:00.000000Z");
        create.commission_id = Some("b".into());
        assert!(matches!(
            store.apply(&create).await.expect("create"),
            Applied::Stored(_)
        ));
        let deletion = CommissionDeletion {
            commission_id: "c".into(),
            version: Some("2026-01-03T00:00:00.000000Z".into()),
            tie: None,
        };
        let deleted = store.delete_commission(&deletion).await.expect("deletion");
        assert!(deleted.deleted_projects.is_empty(), "{deleted:?}");
        let moved_in = event(EventKind::Updated, "p", "2026-01-02T00:00:00.000000Z");
        for attempt in 1..=2 {
            match store.apply(&moved_in).await.expect("move") {
                Applied::Deleted(d) => assert_eq!(d.deleted_projects, ["p"], "attempt {attempt}"),
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        assert!(store.project("p").await.expect("read").is_none());
        store.close().await;
    }

    /// A create its commission's deletion deleted, whatever their keys (Pluto's clock
    /// ahead of this service's, which keyed a plain deletion), handled again (a
    /// redelivery, a retry tier, a replay) is the deletion's as before: not stored again,
    /// and its commission not written back. A create newer than the deleted row (the
    /// project created again after the deletion) is stored as usual.
    async fn a_create_deleted_with_its_commission_applied_again_stays_deleted(store: Store) {
        let create = event(EventKind::Created, "p", "2026-01-01T00:02:00.000000Z");
        assert!(matches!(
            store.apply(&create).await.expect("create"),
            Applied::Stored(_)
        ));
        let deletion = CommissionDeletion {
            commission_id: "c".into(),
            version: Some("2026-01-01T00:01:00.000000Z".into()),
            tie: None,
        };
        let deleted = store.delete_commission(&deletion).await.expect("deletion");
        assert_eq!(deleted.deleted_projects, ["p"]);
        for attempt in 1..=2 {
            match store.apply(&create).await.expect("create again") {
                Applied::Deleted(d) => {
                    assert_eq!(d.commission_id, "c", "attempt {attempt}");
                    assert!(d.deleted_projects.is_empty(), "attempt {attempt}: {d:?}");
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
            assert!(store.project("p").await.expect("read").is_none());
            assert!(store.commission("c").await.expect("read").is_none());
        }
        let again = event(EventKind::Created, "again", "2026-01-01T00:03:00.000000Z");
        match store.apply(&again).await.expect("created again") {
            Applied::Stored(p) => assert_eq!(p.title, "again"),
            other => panic!("a newer create: {other:?}"),
        }
        assert!(store.commission("c").await.expect("read").is_some());
        store.close().await;
    }

    #[tokio::test]
    async fn a_create_deleted_with_its_commission_applied_again_stays_deleted_on_sqlite() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("p.db").display());
        let store = Store::open(&url).await.expect("open");
        a_create_deleted_with_its_commission_applied_again_stays_deleted(store).await;
    }

    #[tokio::test]
    async fn a_create_deleted_with_its_commission_applied_again_stays_deleted_on_postgres() {
        let pg = db::testing::TempPostgres::create().await.expect("postgres");
        let store = Store::open(&pg.url).await.expect("open");
        a_create_deleted_with_its_commission_applied_again_stays_deleted(store).await;
        pg.drop_db().await.expect("drop");
    }
}
