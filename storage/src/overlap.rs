//! Stores that share ground: given one store (or nested ones), online-archive and
//! online-nearline each report a copy where there is one (the second finds the first's
//! object and records it as its own, and a rule meant for one tier's objects removes the
//! other's) — refused; a local store and an online root holding one another (its copies
//! swept as new media, unless the sweeper leaves them out) — warned about.

use std::path::{Path, PathBuf};

use framework::config::ConfigError;

/// Where a store keeps its objects, as far as configuration says.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    /// A bucket and the segments of the key prefix, on a service (`None`: AWS).
    S3 {
        bucket: String,
        prefix: Vec<String>,
        endpoint: Option<String>,
    },
    /// A directory (canonical where it exists, else as written, normalised).
    Dir(PathBuf),
}

impl Place {
    /// The place of the store at `url` (`None`: `<data_dir>/<default_dir>`).
    fn of(url: Option<&str>, endpoint: Option<&str>, data_dir: &Path, default_dir: &str) -> Self {
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
                    // One bucket name on two services is two buckets.
                    endpoint: endpoint.map(|e| e.trim_end_matches('/').to_ascii_lowercase()),
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
                Place::S3 {
                    bucket,
                    prefix,
                    endpoint,
                },
                Place::S3 {
                    bucket: b,
                    prefix: p,
                    endpoint: e,
                },
            ) => bucket == b && endpoint == e && (prefix.starts_with(p) || p.starts_with(prefix)),
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

/// Where a tier's store is configured: its section, its store's key and options table,
/// and the directory under `[storage] data_dir` used when the store is unset.
#[derive(Debug, Clone, Copy)]
pub struct TierKeys {
    /// The service's section (`online_archive`).
    pub section: &'static str,
    /// The store's key in it (`archive_url`).
    pub store: &'static str,
    /// The store's options table in it (`archive_options`).
    pub options: &'static str,
    /// The default store directory under the data directory.
    pub default_dir: &'static str,
}

/// online-archive's store.
pub const ARCHIVE: TierKeys = TierKeys {
    section: "online_archive",
    store: "archive_url",
    options: "archive_options",
    default_dir: "archive",
};

/// online-nearline's store.
pub const NEARLINE: TierKeys = TierKeys {
    section: "online_nearline",
    store: "vault_url",
    options: "vault_options",
    default_dir: "nearline",
};

/// One tier's store as configured.
#[derive(Debug, Clone)]
struct StoreSetting<'a> {
    key: String,
    url: Option<&'a str>,
    endpoint: Option<&'a str>,
    default_dir: &'a str,
}

impl<'a> StoreSetting<'a> {
    fn new(keys: TierKeys, url: Option<&'a str>, endpoint: Option<&'a str>) -> Self {
        Self {
            key: format!("{}.{}", keys.section, keys.store),
            url,
            endpoint,
            default_dir: keys.default_dir,
        }
    }

    fn place(&self, data_dir: &Path) -> Place {
        Place::of(self.url, self.endpoint, data_dir, self.default_dir)
    }
}

/// Refuses `own`'s store (`own_url` on `own_endpoint`) where it is, holds or lies inside
/// `other`'s, as the same files and environment set it (`others`). Where they do not set
/// the other's store (each container configured apart), nothing is known of it: nothing is
/// refused.
pub fn check_apart(
    own: TierKeys,
    own_url: Option<&str>,
    own_endpoint: Option<&str>,
    other: TierKeys,
    others: &framework::config::OtherSections,
    data_dir: &Path,
) -> Result<(), ConfigError> {
    let Some(other_url) = others.get::<String>(other.section, other.store) else {
        return Ok(());
    };
    let other_endpoint =
        others.get::<String>(other.section, &format!("{}.endpoint", other.options));
    check(
        StoreSetting::new(own, own_url, own_endpoint),
        StoreSetting::new(other, Some(&other_url), other_endpoint.as_deref()),
        data_dir,
    )
}

fn check(
    own: StoreSetting<'_>,
    other: StoreSetting<'_>,
    data_dir: &Path,
) -> Result<(), ConfigError> {
    if own.place(data_dir).overlaps(&other.place(data_dir)) {
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
    Ok(())
}

/// Whether a local store (`store`, canonical) and an online root hold one another: its
/// copies may be swept as new media (unless the sweeper leaves them out). The root of it,
/// if one does.
pub fn root_holding_store<'r>(store: &Path, roots: &'r [crate::paths::Root]) -> Option<&'r Path> {
    roots
        .iter()
        .find(|r| store.starts_with(&r.canonical) || r.canonical.starts_with(store))
        .map(|r| r.configured.as_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(own: Option<&str>, other: Option<&str>) -> Result<(), ConfigError> {
        check_on(own, None, other, None)
    }

    fn check_on(
        own: Option<&str>,
        own_endpoint: Option<&str>,
        other: Option<&str>,
        other_endpoint: Option<&str>,
    ) -> Result<(), ConfigError> {
        super::check(
            StoreSetting::new(ARCHIVE, own, own_endpoint),
            StoreSetting::new(NEARLINE, other, other_endpoint),
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
            let e = check(Some(own), Some(other)).expect_err(own);
            assert_eq!(e.key, "online_archive.archive_url");
            assert!(e.message.contains("online_nearline.vault_url"), "{e}");
        }
        // Its own default: one directory under the data directory.
        let e = check(None, Some("/nonexistent-data")).expect_err("default");
        assert!(e.message.contains("/nonexistent-data"), "{e}");
        // One service.
        let e = check_on(
            Some("s3://media"),
            Some("http://minio:9000"),
            Some("s3://media"),
            Some("http://MINIO:9000/"),
        )
        .expect_err("one endpoint");
        assert!(e.message.contains("online_nearline.vault_url"), "{e}");
    }

    #[test]
    fn separate_stores_are_accepted() {
        for (own, other) in [
            (Some("s3://media/archive"), Some("s3://media/nearline")),
            (Some("s3://media/arch"), Some("s3://media/archive")),
            (Some("s3://archive"), Some("s3://vault")),
            (Some("/srv/archive"), Some("/srv/archived")),
            (Some("s3://srv/archive"), Some("/srv/archive")),
            (None, Some("/nonexistent-data/vault")),
        ] {
            check(own, other).unwrap_or_else(|e| panic!("{own:?} {other:?}: {e}"));
        }
        // One bucket name on two services: two buckets.
        check_on(
            Some("s3://media"),
            Some("http://minio-a:9000"),
            Some("s3://media"),
            Some("http://minio-b:9000"),
        )
        .expect("two services");
        check_on(
            Some("s3://media"),
            None,
            Some("s3://media"),
            Some("http://minio:9000"),
        )
        .expect("AWS and a service");
    }

    /// The other tier's store unset in these files and this environment (configured in
    /// its own container): nothing is known of it, nothing refused — not even a store
    /// holding the data directory its default would be under.
    #[test]
    fn another_tier_configured_elsewhere_is_not_guessed_at() {
        let none = framework::config::OtherSections::default();
        check_apart(
            ARCHIVE,
            Some("/"),
            None,
            NEARLINE,
            &none,
            Path::new("/nonexistent-data"),
        )
        .expect("nothing known of it");
    }

    #[test]
    fn a_local_store_and_an_online_root_holding_one_another_are_found() {
        let base = tempfile::tempdir().expect("temp");
        let online = base.path().join("online");
        std::fs::create_dir_all(online.join("vault")).expect("dirs");
        let roots = crate::paths::open_roots(std::slice::from_ref(&online), false).expect("roots");
        let inside = online.join("vault").canonicalize().expect("canonical");
        assert_eq!(root_holding_store(&inside, &roots), Some(online.as_path()));
        let above = base.path().canonicalize().expect("canonical");
        assert_eq!(root_holding_store(&above, &roots), Some(online.as_path()));
        let apart = base.path().join("store");
        assert_eq!(root_holding_store(&apart, &roots), None);
    }
}
