//! Refuses configurations where the two tiers' stores, or a store and an online root,
//! share ground: given one store, online-archive and online-nearline each report a copy
//! where there is one (the second finds the first's object and records it as its own, and
//! a rule meant for one tier's objects removes the other's); a local store inside an
//! online root is swept as new media and copied into itself.

use std::path::{Path, PathBuf};

use framework::config::ConfigError;

/// Where a store keeps its objects, as far as configuration says.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    /// A bucket and the segments of the key prefix.
    S3 { bucket: String, prefix: Vec<String> },
    /// A directory (canonical where it exists, else as written, normalised).
    Dir(PathBuf),
}

impl Place {
    /// The place of the store at `url` (`None`: `<data_dir>/<default_dir>`).
    fn of(url: Option<&str>, data_dir: &Path, default_dir: &str) -> Self {
        match url {
            Some(u) if u.starts_with("s3://") => {
                let rest = &u["s3://".len()..];
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                Place::S3 {
                    bucket: bucket.to_string(),
                    prefix: prefix
                        .split('/')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect(),
                }
            }
            Some(u) => Place::Dir(dir(Path::new(u.strip_prefix("file://").unwrap_or(u)))),
            None => Place::Dir(dir(&data_dir.join(default_dir))),
        }
    }

    /// Whether one of the two holds the other (or they are one).
    fn overlaps(&self, other: &Place) -> bool {
        match (self, other) {
            (
                Place::S3 { bucket, prefix },
                Place::S3 {
                    bucket: b,
                    prefix: p,
                },
            ) => bucket == b && (prefix.starts_with(p) || p.starts_with(prefix)),
            (Place::Dir(a), Place::Dir(b)) => a.starts_with(b) || b.starts_with(a),
            _ => false,
        }
    }
}

/// `p` canonical where it exists (a symlinked spelling is the same directory), else
/// normalised as written.
fn dir(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| {
        crate::paths::normalize(&std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
    })
}

/// Where a tier's store is configured: its section, its store's key and the directory
/// under `[storage] data_dir` used when that is unset.
#[derive(Debug, Clone, Copy)]
pub struct TierKeys {
    /// The service's section (`online_archive`).
    pub section: &'static str,
    /// The store's key in it (`archive_url`).
    pub store: &'static str,
    /// The default store directory under the data directory.
    pub default_dir: &'static str,
}

/// online-archive's store.
pub const ARCHIVE: TierKeys = TierKeys {
    section: "online_archive",
    store: "archive_url",
    default_dir: "archive",
};

/// online-nearline's store.
pub const NEARLINE: TierKeys = TierKeys {
    section: "online_nearline",
    store: "vault_url",
    default_dir: "nearline",
};

/// One tier's store as configured.
#[derive(Debug, Clone)]
struct StoreSetting<'a> {
    key: String,
    url: Option<&'a str>,
    default_dir: &'a str,
}

impl<'a> StoreSetting<'a> {
    fn new(keys: TierKeys, url: Option<&'a str>) -> Self {
        Self {
            key: format!("{}.{}", keys.section, keys.store),
            url,
            default_dir: keys.default_dir,
        }
    }
}

/// Refuses `own`'s store (`own_url`) where it is, holds or lies inside `other`'s (as the
/// same files and environment set it: `others`), or where a local store and one of the
/// online `roots` (none configured: `<data_dir>/online`) hold one another.
pub fn check_apart(
    own: TierKeys,
    own_url: Option<&str>,
    other: TierKeys,
    others: &framework::config::OtherSections,
    roots: &[PathBuf],
    data_dir: &Path,
) -> Result<(), ConfigError> {
    let other_url = others.get::<String>(other.section, other.store);
    check(
        StoreSetting::new(own, own_url),
        StoreSetting::new(other, other_url.as_deref()),
        &format!("{}.online_roots", own.section),
        roots,
        data_dir,
    )
}

fn check(
    own: StoreSetting<'_>,
    other: StoreSetting<'_>,
    roots_key: &str,
    roots: &[PathBuf],
    data_dir: &Path,
) -> Result<(), ConfigError> {
    let mine = Place::of(own.url, data_dir, own.default_dir);
    let theirs = Place::of(other.url, data_dir, other.default_dir);
    if mine.overlaps(&theirs) {
        return Err(ConfigError::new(
            &own.key,
            format!(
                "`{}` and `{}` (`{}` in these files and this environment) are one store, or \
                 one holds the other: each tier needs a store of its own — given one, each \
                 finds the other's copy and reports it as its own, so a file is kept once \
                 where two copies are reported",
                own.url.unwrap_or(own.default_dir),
                other.url.unwrap_or(other.default_dir),
                other.key,
            ),
        ));
    }
    let default_root = [data_dir.join("online")];
    let roots = if roots.is_empty() {
        &default_root[..]
    } else {
        roots
    };
    if let Place::Dir(store) = &mine {
        for root in roots {
            let root_dir = dir(root);
            if store.starts_with(&root_dir) || root_dir.starts_with(store) {
                return Err(ConfigError::new(
                    &own.key,
                    format!(
                        "`{}` and the online root {} (`{roots_key}`) hold one another: the \
                         copies would be swept as new media and copied again, into themselves",
                        own.url.unwrap_or(own.default_dir),
                        root.display(),
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(own: Option<&str>, other: Option<&str>, roots: &[&str]) -> Result<(), ConfigError> {
        let roots: Vec<PathBuf> = roots.iter().map(PathBuf::from).collect();
        super::check(
            StoreSetting::new(ARCHIVE, own),
            StoreSetting::new(NEARLINE, other),
            "online_archive.online_roots",
            &roots,
            Path::new("/nonexistent-data"),
        )
    }

    #[test]
    fn one_store_for_both_tiers_is_refused() {
        for (own, other) in [
            ("s3://media/p", "s3://media/p"),
            ("s3://media/p/", "s3://media//p"),
            ("s3://media", "s3://media/nearline"),
            ("s3://media/a/b", "s3://media/a"),
            ("/srv/store", "file:///srv/store/"),
            ("/srv/store/nearline", "/srv/store"),
            ("/srv/./store", "/srv/x/../store"),
        ] {
            let e = check(Some(own), Some(other), &[]).expect_err(own);
            assert_eq!(e.key, "online_archive.archive_url");
            assert!(e.message.contains("online_nearline.vault_url"), "{e}");
        }
        // The defaults: one directory each under the data directory.
        let e = check(Some("/nonexistent-data/nearline"), None, &[]).expect_err("default");
        assert!(e.message.contains("nearline"), "{e}");
    }

    #[test]
    fn separate_stores_are_accepted() {
        for (own, other) in [
            (Some("s3://media/archive"), Some("s3://media/nearline")),
            (Some("s3://media/arch"), Some("s3://media/archive")),
            (Some("s3://archive"), Some("s3://vault")),
            (Some("/srv/archive"), Some("/srv/archived")),
            (Some("s3://srv/archive"), Some("/srv/archive")),
            (None, None),
        ] {
            check(own, other, &[]).unwrap_or_else(|e| panic!("{own:?} {other:?}: {e}"));
        }
    }

    #[test]
    fn a_local_store_and_an_online_root_holding_one_another_are_refused() {
        for (store, roots) in [
            (Some("/srv/online/archive"), &["/srv/online"][..]),
            (Some("/srv"), &["/mnt/a", "/srv/online"][..]),
            (None, &["/nonexistent-data"][..]),
            (Some("/nonexistent-data/online/x"), &[][..]),
        ] {
            let e = check(store, Some("s3://vault"), roots).expect_err("overlap");
            assert!(e.message.contains("online_archive.online_roots"), "{e}");
        }
        check(Some("/srv/archive"), Some("s3://vault"), &["/srv/online"]).expect("apart");
        check(Some("s3://srv/online"), None, &["/srv/online"]).expect("not a directory");
    }
}
