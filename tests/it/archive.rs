//! Hostile and corrupt archives (fixtures in testdata/hostile, made by make.py).

use cairn::archive::unpack::{Expected, Mode, unpack};
use cairn::cluster::Selection;
use cairn::manifest::{FileInfo, NodeInfo};
use std::path::Path;

#[derive(serde::Deserialize)]
struct Case {
    object: String,
    size: u64,
    sha256: String,
    declared: Vec<FileInfo>,
    refuse: String,
}

#[test]
fn hostile_archives_are_refused_with_nothing_written_outside() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/hostile");
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 14);
    for c in cases {
        // sandbox/staging is the target; sandbox/ must hold nothing else afterwards.
        let sandbox = tempfile::tempdir().unwrap();
        let staging = sandbox.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let node = NodeInfo {
            index: 0,
            object: "node-0.tar.gz".into(),
            keyspaces: vec!["ks".into()],
            file_count: c.declared.len() as u64,
            bytes: c.declared.iter().map(|f| f.size).sum(),
            compressed_bytes: c.size,
            files: c.declared.clone(),
            tree: vec![],
        };
        let expected = Expected {
            object: &c.object,
            node: &node,
            object_size: c.size,
            object_sha256: &c.sha256,
            keys: None,
            owners: None,
            renames: &[],
            partial: false,
            dirs_open: false,
        };
        let file = std::fs::File::open(dir.join(&c.object)).unwrap();
        let result = unpack(
            file,
            &expected,
            &Selection::default(),
            Mode::Extract(&staging),
            |_| {},
        );
        let outside: Vec<_> = std::fs::read_dir(sandbox.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            outside,
            vec![std::ffi::OsString::from("staging")],
            "{}",
            c.object
        );
        assert!(!Path::new("/tmp/cairn-hostile-absolute.txt").exists());
        if c.refuse.is_empty() {
            result.unwrap_or_else(|e| panic!("{}: {e}", c.object));
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(staging.join("ks/a"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o755, "setuid bit must be dropped");
        } else {
            let err = result.expect_err(&c.object).to_string();
            assert!(err.contains(&c.refuse), "{}: {err}", c.object);
        }
    }
}

#[test]
fn truncated_and_garbage_objects_are_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/hostile");
    let data = std::fs::read(dir.join("setuid.tar.gz")).unwrap();
    let node = NodeInfo {
        index: 0,
        object: "node-0.tar.gz".into(),
        keyspaces: vec!["ks".into()],
        file_count: 0,
        bytes: 0,
        compressed_bytes: 0,
        files: vec![],
        tree: vec![],
    };
    for bad in [data[..data.len() / 2].to_vec(), b"not gzip at all".to_vec()] {
        let expected = Expected {
            object: "x",
            node: &node,
            object_size: 0,
            object_sha256: "",
            keys: None,
            owners: None,
            renames: &[],
            partial: false,
            dirs_open: false,
        };
        let err = unpack(
            &bad[..],
            &expected,
            &Selection::default(),
            Mode::Verify,
            |_| {},
        )
        .expect_err("must refuse");
        assert!(matches!(err, cairn::Error::Archive { .. }), "{err}");
    }
}
