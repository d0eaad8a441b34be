//! Property tests (bounded fuzzing) of every input parser: arbitrary and mutated inputs
//! never panic, and the safety properties hold (a resolved path is always inside a root,
//! a parsed queue spec is always in range).

use proptest::prelude::*;
use serde_json::{Value, json};

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        prop_oneof![
            Just("v2/raw_crash/000/20180313/00007bd0-2d1c-4865-af09-80bc00180313".to_string()),
            Just("ObjectCreated:Put".to_string()),
            Just("project-created".to_string()),
            Just("project-updated".to_string()),
            Just("eyJ0eXBlIjoicHJvamVjdC1jcmVhdGVkIn0=".to_string()),
            Just("true".to_string()),
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let keys = prop_oneof![
            Just("Records".to_string()),
            Just("body".to_string()),
            Just("kinesis".to_string()),
            Just("data".to_string()),
            Just("eventName".to_string()),
            Just("s3".to_string()),
            Just("object".to_string()),
            Just("key".to_string()),
            Just("type".to_string()),
            Just("id".to_string()),
            Just("correlation_id".to_string()),
            Just("collection_name".to_string()),
            Just("files_exported".to_string()),
            "[a-z_]{1,12}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An online root `online` holding `inside/f.txt` ("in") and `inside/link`, a symlink to
/// `secret` beside the root, which holds `s.txt` ("out").
fn root_with_a_link_out() -> (tempfile::TempDir, Vec<storage::paths::Root>) {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("online");
    std::fs::create_dir_all(root.join("inside")).unwrap();
    std::fs::create_dir_all(base.path().join("secret")).unwrap();
    std::fs::write(root.join("inside/f.txt"), b"in").unwrap();
    std::fs::write(base.path().join("secret/s.txt"), b"out").unwrap();
    std::os::unix::fs::symlink(base.path().join("secret"), root.join("inside/link")).unwrap();
    let roots = storage::paths::open_roots(std::slice::from_ref(&root), false).unwrap();
    (base, roots)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn asset_sweeper_message_decoding_never_panics(v in any_json()) {
        let _ = serde_json::from_value::<storage::AssetSweeperFile>(v);
    }

    #[test]
    fn pluto_events_and_kinesis_envelopes_never_panic(v in any_json()) {
        for item in project_ingest::event::items(&v, "2024-01-01T00:00:00Z") {
            let _ = item.parsed;
        }
        let _ = project_ingest::event::parse_project(&v, None);
    }

    #[test]
    fn s3_notifications_and_crash_ids_never_panic(v in any_json(), s in "\\PC{0,60}") {
        let _ = crash_router::rules::classify(&v, &crash_router::rules::Rules::digits('0', '1'));
        let _ = crash_router::rules::is_crash_id(&s);
        let _ = crash_router::rules::is_put_event(&s);
        let rec = json!({"eventName": "ObjectCreated:Put", "s3": {"object": {"key": s}}});
        let _ = crash_router::rules::classify(&rec, &crash_router::rules::Rules::digits('0', '1'));
    }

    #[test]
    fn queue_specs_parse_into_range_or_fail(s in "[ a-z0-9.:,\t-]{0,60}|\\PC{0,30}") {
        if let Ok(specs) = crash_router::spec::parse_queues(&s) {
            for q in specs {
                prop_assert!(q.throttle <= 100);
                prop_assert!(!q.name.trim().is_empty());
            }
        }
    }

    #[test]
    fn snapshot_status_records_never_panic(v in any_json()) {
        let _ = snapshot_status::message::decode(&v);
        let wrapped = json!({"Records": [{"body": v.to_string()}, {"body": v}]});
        let _ = snapshot_status::message::decode(&wrapped);
    }

    #[test]
    fn event_envelopes_never_panic(v in any_json()) {
        let text = v.to_string();
        if let Ok(raw) = serde_json::from_str::<Box<serde_json::value::RawValue>>(&text) {
            let _ = event_forwarder::envelope::split(&raw);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Whatever the message says, a resolved path lies inside the online root.
    #[test]
    fn resolved_paths_never_leave_the_roots(
        parts in prop::collection::vec(prop_oneof![
            Just("..".to_string()), Just(".".to_string()), Just("".to_string()),
            Just("link".to_string()), Just("inside".to_string()), Just("secret".to_string()),
            "[a-z]{1,4}",
        ], 0..6),
        absolute in any::<bool>(),
        name in prop_oneof![Just("f.txt".to_string()), Just("s.txt".to_string()), Just("..".to_string()), "[a-z./]{0,6}"],
    ) {
        let (_base, roots) = root_with_a_link_out();
        let root = &roots[0].configured;
        let rel = parts.join("/");
        let filepath = if absolute { format!("{}/{rel}", root.display()) } else { rel };
        if let Ok(r) = storage::paths::resolve(&roots, &filepath, &name) {
            prop_assert!(r.path.starts_with(&roots[0].canonical), "{} escaped", r.path.display());
            prop_assert!(!r.relative.contains(".."));
            // What was opened, not only its name: the only file inside holds "in".
            let mut body = String::new();
            std::io::Read::read_to_string(&mut &r.file, &mut body).unwrap();
            prop_assert_eq!(body, "in", "{} opened a file outside the root", r.path.display());
        }
    }
}

/// The property above holds for paths it never resolves too: the file inside resolves,
/// the one behind the symlink leading out never does.
#[test]
fn the_file_inside_resolves_and_the_one_through_a_link_out_does_not() {
    let (_base, roots) = root_with_a_link_out();
    let r = storage::paths::resolve(&roots, "inside", "f.txt").expect("inside resolves");
    assert_eq!(r.relative, "inside/f.txt");
    for (dir, name) in [
        ("inside/link", "s.txt"),
        ("inside/../inside/link", "s.txt"),
        ("inside", "link/s.txt"),
    ] {
        assert!(
            storage::paths::resolve(&roots, dir, name).is_err(),
            "{dir}/{name} leads out through the symlink"
        );
    }
}
