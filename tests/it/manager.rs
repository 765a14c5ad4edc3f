//! Manager snapshots: round trips, credentials, clean and version rules, rollback,
//! kept format fixtures, hostile and corrupt zips, restore plans and `recover`.

use crate::it::helpers::{Sandbox, assert_restored, noise, source_cluster, text};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const SECRET_KEY: &[u8] = b"-----BEGIN KEY-----\nagent-key-7f3a9c-do-not-leak\n-----END KEY-----\n";

/// Regular files under `dir`: relative path → (mode, SHA-256).
fn files(dir: &Path) -> BTreeMap<String, (u32, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, String)>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
                let sha = hex::encode(Sha256::digest(std::fs::read(&p).unwrap()));
                out.insert(rel, (m.permissions().mode() & 0o777, sha));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn without_prefix(
    mut t: BTreeMap<String, (u32, String)>,
    prefix: &str,
) -> BTreeMap<String, (u32, String)> {
    t.retain(|k, _| !k.starts_with(prefix));
    t
}

fn write(path: &Path, data: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A manager state dir with a database, blueprints, a binary plugin and credentials.
fn fill_manager(dir: &Path) {
    write(
        &dir.join("db/deployments.json"),
        br#"{"deployments":["web"]}"#,
        0o640,
    );
    write(
        &dir.join("blueprints/web/blueprint.yaml"),
        b"node_templates: {}\n",
        0o644,
    );
    write(
        &dir.join("plugins/openstack.wgn"),
        &noise(5, 300_000),
        0o644,
    );
    write(&dir.join("manager.conf"), b"broker_ip = 10.0.0.5\n", 0o600);
    write(&dir.join("credentials/agents/vm1.pem"), SECRET_KEY, 0o600);
}

/// A source cluster of two nodes (`extra` bytes of noise each) whose description has a filled `[manager]`
/// (version 2.3.0); returns the description and the manager's state dir.
fn cluster_with_manager(sb: &Sandbox, extra: usize) -> (PathBuf, PathBuf) {
    let src = source_cluster(sb.dir.path(), 2, extra);
    let state = sb.path("mgr/state");
    fill_manager(&state);
    let mut t = std::fs::read_to_string(&src).unwrap();
    t.push_str(&format!(
        "[manager]\nstate_dir = {state:?}\nversion = \"2.3.0\"\n"
    ));
    std::fs::write(&src, t).unwrap();
    (src, state)
}

/// A cluster description with `[manager]` (and `nodes`); returns its path.
fn manager_cluster(
    sb: &Sandbox,
    name: &str,
    state_dir: &Path,
    version: &str,
    extra: &str,
    nodes: &[(u32, PathBuf)],
) -> PathBuf {
    let mut t = format!("name = {name:?}\n");
    for (i, d) in nodes {
        t.push_str(&format!("[[nodes]]\nindex = {i}\ndata_dir = {d:?}\n"));
    }
    if nodes.is_empty() {
        t.push_str(&format!(
            "[[nodes]]\nindex = 0\ndata_dir = {:?}\n",
            sb.path(&format!("{name}-node-0"))
        ));
    }
    t.push_str(&format!(
        "[manager]\nstate_dir = {state_dir:?}\nversion = {version:?}\n{extra}\n"
    ));
    let path = sb.path(&format!("{name}.toml"));
    std::fs::write(&path, t).unwrap();
    path
}

/// `manager-snapshot VERB ID --store STORE --cluster CLUSTER EXTRA…`
fn ms<'a>(
    verb: &'a str,
    id: &'a str,
    store: &'a str,
    cluster: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "manager-snapshot",
        verb,
        id,
        "--store",
        store,
        "--cluster",
        cluster,
    ];
    a.extend_from_slice(extra);
    a
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn store_url(sb: &Sandbox) -> String {
    format!("file://{}", sb.path("store").display())
}

/// Entry names inside a zip file.
fn zip_names(path: &Path) -> Vec<String> {
    let a = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    a.file_names().map(|n| n.unwrap().to_string()).collect()
}

#[test]
fn create_and_restore_round_trip_with_and_without_credentials() {
    let sb = Sandbox::new();
    let src = sb.path("mgr/state");
    fill_manager(&src);
    let c = manager_cluster(&sb, "src", &src, "2.3.0", "", &[]);
    let store = store_url(&sb);
    sb.ok(&ms("create", "plain", &store, s(&c), &[]));
    sb.ok(&ms(
        "create",
        "full",
        &store,
        s(&c),
        &["--include-credentials"],
    ));
    // The listing says which snapshots hold credentials.
    let out = sb.ok(&["manager-snapshot", "list", "--store", &store, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let creds: BTreeMap<String, (bool, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                (
                    s["credentials"].as_bool().unwrap(),
                    s["status"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    assert_eq!(creds["plain"], (false, "created".into()));
    assert_eq!(creds["full"], (true, "created".into()));
    // Without --include-credentials the key is nowhere in the zip.
    sb.ok(&[
        "manager-snapshot",
        "download",
        "plain",
        "-o",
        "plain.zip",
        "--store",
        &store,
    ]);
    assert!(
        zip_names(&sb.path("plain.zip"))
            .iter()
            .all(|n| !n.contains("credentials/"))
    );
    let mut a = zip::ZipArchive::new(std::fs::File::open(sb.path("plain.zip")).unwrap()).unwrap();
    for i in 0..a.len() {
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut a.by_index(i).unwrap(), &mut data).unwrap();
        assert!(!data.windows(SECRET_KEY.len()).any(|w| w == SECRET_KEY));
    }
    // download never overwrites.
    let again = sb.run(&[
        "manager-snapshot",
        "download",
        "plain",
        "-o",
        "plain.zip",
        "--store",
        &store,
    ]);
    assert_eq!(again.status.code(), Some(2));

    // Onto clean managers at new locations running a newer version.
    let t1 = sb.path("new1/state");
    let c1 = manager_cluster(&sb, "new1", &t1, "2.4.0", "", &[]);
    sb.ok(&ms("restore", "plain", &store, s(&c1), &[]));
    assert_eq!(files(&t1), without_prefix(files(&src), "credentials/"));
    let t2 = sb.path("new2/state");
    let c2 = manager_cluster(&sb, "new2", &t2, "2.4.0", "", &[]);
    sb.ok(&ms("restore", "full", &store, s(&c2), &[]));
    assert_eq!(files(&t2), files(&src));
    // A target whose credentials live elsewhere gets them there.
    let t3 = sb.path("new3/state");
    let c3 = manager_cluster(
        &sb,
        "new3",
        &t3,
        "2.3.0",
        "credentials = \"secrets/tls\"",
        &[],
    );
    sb.ok(&ms("restore", "full", &store, s(&c3), &[]));
    assert_eq!(
        std::fs::read(t3.join("secrets/tls/agents/vm1.pem")).unwrap(),
        SECRET_KEY
    );
    assert!(!t3.join("credentials").exists());

    // delete removes it from the listing; a second delete is "not found".
    sb.ok(&["manager-snapshot", "delete", "plain", "--store", &store]);
    let gone = sb.run(&["manager-snapshot", "delete", "plain", "--store", &store]);
    assert_eq!(gone.status.code(), Some(5));
}

#[test]
fn a_manager_that_is_not_clean_is_refused_unless_forced_and_rollback_works() {
    let sb = Sandbox::new();
    let state = sb.path("mgr/state");
    fill_manager(&state);
    let c = manager_cluster(&sb, "m", &state, "2.3.0", "", &[]);
    let store = store_url(&sb);
    sb.ok(&ms(
        "create",
        "snap",
        &store,
        s(&c),
        &["--include-credentials"],
    ));
    let snapshotted = files(&state);
    // The manager moves on: a new deployment, a changed file.
    write(
        &state.join("db/deployments.json"),
        br#"{"deployments":["web","db"]}"#,
        0o640,
    );
    write(
        &state.join("blueprints/db/blueprint.yaml"),
        b"x: 1\n",
        0o644,
    );
    let current = files(&state);

    let out = sb.run(&ms("restore", "snap", &store, s(&c), &[]));
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("not clean"), "{:?}", text(&out));
    assert_eq!(
        files(&state),
        current,
        "a refused restore changed the state"
    );
    let st = sb.ok(&["manager-snapshot", "status", "--cluster", s(&c), "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["clean"], false);

    sb.ok(&ms("restore", "snap", &store, s(&c), &["--force"]));
    assert_eq!(files(&state), snapshotted);
    let copies: Vec<PathBuf> = std::fs::read_dir(sb.path("mgr"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(".state.pre-restore-")
        })
        .collect();
    assert_eq!(copies.len(), 1);
    assert_eq!(
        files(&copies[0]),
        current,
        "the pre-restore copy is the replaced state"
    );

    sb.ok(&["manager-snapshot", "rollback", "--cluster", s(&c)]);
    assert_eq!(
        files(&state),
        current,
        "rollback brings the replaced state back"
    );
}

#[test]
fn a_snapshot_from_a_newer_manager_is_refused() {
    let sb = Sandbox::new();
    let state = sb.path("mgr/state");
    fill_manager(&state);
    let c = manager_cluster(&sb, "m", &state, "3.1.0", "", &[]);
    let store = store_url(&sb);
    sb.ok(&ms("create", "new", &store, s(&c), &[]));
    let old = sb.path("old/state");
    // The old manager reads its version from a file inside its state dir.
    write(&old.join("VERSION"), b"3.0.2\n", 0o644);
    let c_old = manager_cluster(&sb, "old", &old, "", "", &[]);
    let text_old = std::fs::read_to_string(&c_old).unwrap().replace(
        "version = \"\"",
        &format!("version_file = {:?}", old.join("VERSION")),
    );
    std::fs::write(&c_old, text_old).unwrap();
    let before = files(&old);
    let out = sb.run(&ms("restore", "new", &store, s(&c_old), &["--force"]));
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("newer than this manager's 3.0.2"),
        "{:?}",
        text(&out)
    );
    assert_eq!(files(&old), before);
    assert_eq!(
        std::fs::read_dir(sb.path("old")).unwrap().count(),
        1,
        "nothing beside the state dir"
    );
}

/// The manager the fixtures were made from.
fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/manager-snapshots")
}

#[test]
fn every_kept_format_fixture_restores_with_the_current_code() {
    let root = fixture_root();
    let source = files(&root.join("source/state"));
    let mut versions = Vec::new();
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if let Some(v) = name.strip_prefix('v') {
            versions.push((v.parse::<u32>().unwrap(), p.join("manager.zip")));
        }
    }
    versions.sort();
    assert!(versions.len() >= 2, "fixtures for v1 and v2 are kept");
    assert_eq!(
        versions.iter().map(|v| v.0).collect::<Vec<_>>(),
        (1..=versions.len() as u32).collect::<Vec<_>>()
    );
    for (v, zip) in versions {
        let sb = Sandbox::new();
        let store = store_url(&sb);
        sb.ok(&[
            "manager-snapshot",
            "upload",
            s(&zip),
            "--id",
            "fixture",
            "--store",
            &store,
        ]);
        let out = sb.ok(&["manager-snapshot", "list", "--store", &store, "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(list[0]["format"], v, "the listing shows the format");
        // Onto a newer manager that keeps credentials under another sub-path.
        let state = sb.path("mgr/state");
        let c = manager_cluster(&sb, "m", &state, "2.4.0", "credentials = \"keys\"", &[]);
        let out = sb.ok(&ms("restore", "fixture", &store, s(&c), &[]));
        assert!(
            text(&out).0.contains(&format!("format v{v}")),
            "{:?}",
            text(&out)
        );
        let restored = files(&state);
        // Content from the source tree; modes as the fixture recorded them (a git
        // checkout does not keep the source's 0600 on the key).
        let expected: BTreeMap<String, (u32, String)> = source
            .iter()
            .map(|(k, (_, sha))| {
                let mode = if k.starts_with("credentials/") {
                    0o600
                } else {
                    0o644
                };
                (k.replacen("credentials/", "keys/", 1), (mode, sha.clone()))
            })
            .collect();
        assert_eq!(restored, expected, "fixture v{v}");
    }
}

/// A zip with `metadata` and `entries` (name, data); `symlinks` are link entries.
fn make_zip(
    path: &Path,
    metadata: &serde_json::Value,
    entries: &[(&str, &[u8])],
    symlinks: &[(&str, &str)],
) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let o = zip::write::SimpleFileOptions::default();
    for (name, data) in entries {
        z.start_file(*name, o).unwrap();
        z.write_all(data).unwrap();
    }
    for (name, target) in symlinks {
        z.add_symlink(*name, *target, o).unwrap();
    }
    z.start_file("metadata.json", o).unwrap();
    z.write_all(&serde_json::to_vec(metadata).unwrap()).unwrap();
    z.finish().unwrap();
}

fn entry(name: &str, path: &str, data: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "name": name, "kind": "state", "path": path, "size": data.len(),
        "sha256": hex::encode(Sha256::digest(data)), "mode": 0o644
    })
}

fn metadata(entries: Vec<serde_json::Value>, total: u64) -> serde_json::Value {
    serde_json::json!({
        "format_version": 2, "snapshot_id": "evil", "manager_version": "1.0.0",
        "cairn_version": "0.1.0", "created_at": "2026-01-01T00:00:00Z",
        "credentials_included": false, "total_bytes": total, "entries": entries
    })
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A zip written by hand, so its headers can lie: entries of (name, deflated data,
/// CRC-32 and uncompressed size to declare).
fn raw_zip(path: &Path, entries: &[(&str, Vec<u8>, u32, u32)]) {
    let mut out: Vec<u8> = Vec::new();
    let mut central: Vec<u8> = Vec::new();
    let u16le = |v: u16| v.to_le_bytes();
    let u32le = |v: u32| v.to_le_bytes();
    for (name, data, crc, size) in entries {
        let offset = out.len() as u32;
        let common = [
            &u16le(20)[..],
            &u16le(0),
            &u16le(8),
            &u16le(0),
            &u16le(0x21),
            &u32le(*crc),
            &u32le(data.len() as u32),
            &u32le(*size),
            &u16le(name.len() as u16),
            &u16le(0),
        ]
        .concat();
        out.extend_from_slice(&u32le(0x0403_4b50));
        out.extend_from_slice(&common);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(&u32le(0x0201_4b50));
        central.extend_from_slice(&u16le(3 << 8 | 20));
        central.extend_from_slice(&common);
        central.extend_from_slice(
            &[
                &u16le(0)[..],
                &u16le(0),
                &u16le(0),
                &u32le(0o100644 << 16),
                &u32le(offset),
            ]
            .concat(),
        );
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&u32le(0x0605_4b50));
    out.extend_from_slice(
        &[
            &u16le(0)[..],
            &u16le(0),
            &u16le(entries.len() as u16),
            &u16le(entries.len() as u16),
            &u32le(central.len() as u32),
            &u32le(cd_offset),
            &u16le(0),
        ]
        .concat(),
    );
    std::fs::write(path, out).unwrap();
}

/// Put a zip straight into the store (as a compromised store would), bypassing
/// `upload`'s checks.
fn plant(sb: &Sandbox, id: &str, zip: &Path) {
    let dir = sb.path(&format!("store/.cairn-manager/{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(zip, dir.join("manager.zip")).unwrap();
    std::fs::write(
        dir.join("status.json"),
        serde_json::to_vec(&serde_json::json!({
            "id": id, "status": "uploaded", "created_at": null, "manager_version": null,
            "credentials": null, "size": null, "sha256": null, "format": null
        }))
        .unwrap(),
    )
    .unwrap();
}

#[test]
fn hostile_zips_are_refused_and_nothing_is_written_outside_the_target() {
    let sb = Sandbox::new();
    let ok = b"fine".as_slice();
    let bomb = vec![0u8; 64 << 20];
    let dup_zip = sb.path("dup.zip");
    {
        // Two entries, then the second's name rewritten to the first's.
        make_zip(
            &dup_zip,
            &metadata(
                vec![
                    entry("state/aaaa", "aaaa", ok),
                    entry("state/aaab", "aaab", ok),
                ],
                8,
            ),
            &[("state/aaaa", ok), ("state/aaab", ok)],
            &[],
        );
        let bytes = std::fs::read(&dup_zip).unwrap();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i..].starts_with(b"state/aaab") {
                out.extend_from_slice(b"state/aaaa");
                i += 10;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        std::fs::write(&dup_zip, out).unwrap();
    }
    let cases: Vec<(&str, PathBuf)> = vec![
        ("slip", {
            let p = sb.path("slip.zip");
            make_zip(
                &p,
                &metadata(vec![entry("state/../../evil", "../../evil", ok)], 4),
                &[("state/../../evil", ok)],
                &[],
            );
            p
        }),
        ("undeclared-slip", {
            let p = sb.path("undeclared.zip");
            make_zip(
                &p,
                &metadata(vec![entry("state/a", "a", ok)], 4),
                &[("state/a", ok), ("../../evil", ok)],
                &[],
            );
            p
        }),
        ("absolute", {
            let p = sb.path("abs.zip");
            let target = sb.path("evil-abs");
            let name = target.to_str().unwrap().to_string();
            make_zip(
                &p,
                &metadata(vec![entry(&name, &name, ok)], 4),
                &[(&name, ok)],
                &[],
            );
            p
        }),
        ("symlink", {
            let p = sb.path("link.zip");
            make_zip(
                &p,
                &metadata(vec![entry("state/link", "link", b"/etc/passwd")], 11),
                &[],
                &[("state/link", "/etc/passwd")],
            );
            p
        }),
        ("duplicate", dup_zip.clone()),
        ("deflate bomb", {
            let p = sb.path("bomb.zip");
            // Declares 4 bytes; inflates to 64 MiB.
            let mut e = entry("state/db", "db", ok);
            e["sha256"] = serde_json::json!(hex::encode(Sha256::digest(ok)));
            make_zip(&p, &metadata(vec![e], 4), &[("state/db", &bomb)], &[]);
            p
        }),
        ("lying deflate bomb", {
            // Zip headers and metadata both say 4 bytes; the deflate stream holds
            // 64 MiB. Only reading stops it.
            let p = sb.path("lying-bomb.zip");
            let meta = metadata(vec![entry("state/db", "db", ok)], 4).to_string();
            raw_zip(
                &p,
                &[
                    ("state/db", deflate(&bomb), crc32fast::hash(ok), 4),
                    (
                        "metadata.json",
                        deflate(meta.as_bytes()),
                        crc32fast::hash(meta.as_bytes()),
                        meta.len() as u32,
                    ),
                ],
            );
            p
        }),
        ("total beyond declared", {
            let p = sb.path("total.zip");
            make_zip(
                &p,
                &metadata(vec![entry("state/a", "a", ok)], 1),
                &[("state/a", ok)],
                &[],
            );
            p
        }),
    ];
    let store = store_url(&sb);
    let state = sb.path("mgr/state");
    let c = manager_cluster(&sb, "m", &state, "2.0.0", "", &[]);
    for (what, zip) in &cases {
        // upload checks the file first and stores nothing.
        let out = sb.run(&[
            "manager-snapshot",
            "upload",
            s(zip),
            "--id",
            "up",
            "--store",
            &store,
        ]);
        assert!(!out.status.success(), "{what}: upload accepted");
        assert!(
            !sb.path("store/.cairn-manager/up").exists(),
            "{what}: upload stored something"
        );
        // A planted zip is refused by restore.
        let id = what.replace(' ', "-");
        plant(&sb, &id, zip);
        let out = sb.run(&ms("restore", &id, &store, s(&c), &[]));
        assert_eq!(out.status.code(), Some(1), "{what}: {:?}", text(&out));
        let why = match *what {
            "slip" | "absolute" => "escapes the target",
            "undeclared-slip" => "is not declared",
            "symlink" => "is a link",
            "duplicate" => "same name",
            "deflate bomb" => "but 4 in the metadata",
            "lying deflate bomb" => "larger than its declared",
            _ => "declares a total of 1 bytes",
        };
        assert!(text(&out).1.contains(why), "{what}: {:?}", text(&out));
        assert!(!state.exists(), "{what}: the state dir was created");
        let beside: Vec<String> = std::fs::read_dir(sb.path("mgr"))
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert!(beside.is_empty(), "{what}: left {beside:?}");
    }
    for evil in ["evil", "evil-abs", "../evil"] {
        assert!(!sb.path(evil).exists(), "{evil} was written");
    }
}

#[test]
fn a_corrupt_entry_is_refused_before_the_state_dir_is_touched() {
    let sb = Sandbox::new();
    let state = sb.path("mgr/state");
    fill_manager(&state);
    let c = manager_cluster(&sb, "m", &state, "2.3.0", "", &[]);
    let store = store_url(&sb);
    sb.ok(&ms("create", "snap", &store, s(&c), &[]));
    // Flip one byte in the middle of the plugin's compressed data; keep the recorded
    // checksum of the whole object in line, as a store that rots under it would not.
    let zip = sb.path("store/.cairn-manager/snap/manager.zip");
    let mut bytes = std::fs::read(&zip).unwrap();
    let at = bytes
        .windows(b"plugins/openstack.wgn".len())
        .position(|w| w == b"plugins/openstack.wgn")
        .unwrap()
        + 1000;
    bytes[at] ^= 0x40;
    std::fs::write(&zip, &bytes).unwrap();
    let status = sb.path("store/.cairn-manager/snap/status.json");
    let mut st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&status).unwrap()).unwrap();
    st["sha256"] = serde_json::json!(hex::encode(Sha256::digest(&bytes)));
    std::fs::write(&status, serde_json::to_vec(&st).unwrap()).unwrap();
    write(&state.join("db/deployments.json"), b"{}", 0o640);
    let before = files(&state);
    let out = sb.run(&ms("restore", "snap", &store, s(&c), &["--force"]));
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert_eq!(files(&state), before);
    let beside: Vec<_> = std::fs::read_dir(sb.path("mgr")).unwrap().collect();
    assert_eq!(beside.len(), 1, "no staging dir, no pre-restore copy left");
}

#[test]
fn restore_plan_restores_the_manager_only_when_asked_and_checks_it_first() {
    let sb = Sandbox::new();
    let (src, state) = cluster_with_manager(&sb, 10_000);
    let dir = sb.path("backups");
    let p = |k: &str, v: &str| format!("{k}={v}");
    sb.ok(&[
        "plan",
        "start",
        "backup-local",
        "--cluster",
        s(&src),
        "-p",
        &p("SNAPSHOT_NAME", "s1"),
        "-p",
        &p("BACKUP_DIR", s(&dir)),
    ]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("s1/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["manager"]["manager_version"], "2.3.0");
    assert!(
        manifest["objects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["key"] == "manager.zip")
    );

    // Target: a manager that is not clean; RESTORE_MANAGER=true is refused before
    // any node is touched.
    let tstate = sb.path("tmgr/state");
    write(&tstate.join("db/other.json"), b"{}", 0o644);
    let nodes: Vec<(u32, PathBuf)> = (0..2)
        .map(|i| (i, sb.path(&format!("tgt/node-{i}"))))
        .collect();
    let tc = manager_cluster(&sb, "tgt", &tstate, "2.4.0", "", &nodes);
    let out = sb.run(&[
        "plan",
        "start",
        "restore-local",
        "--cluster",
        s(&tc),
        "-p",
        &p("SNAPSHOT_NAME", "s1"),
        "-p",
        &p("BACKUP_DIR", s(&dir)),
        "-p",
        "RESTORE_MANAGER=true",
    ]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        !sb.path("tgt/node-0").exists()
            || std::fs::read_dir(sb.path("tgt/node-0")).unwrap().count() == 0
    );
    // Forced: nodes and manager restored, the old manager state kept aside.
    sb.ok(&[
        "plan",
        "start",
        "restore-local",
        "--cluster",
        s(&tc),
        "-p",
        &p("SNAPSHOT_NAME", "s1"),
        "-p",
        &p("BACKUP_DIR", s(&dir)),
        "-p",
        "RESTORE_MANAGER=force",
    ]);
    assert_restored(&sb, "tgt", 2);
    assert_eq!(
        files(&tstate),
        without_prefix(files(&state), "credentials/")
    );
    // `snapshots verify` checks the manager snapshot too.
    let store = format!("file://{}", dir.display());
    sb.ok(&[
        "snapshots",
        "verify",
        "s1",
        "--store",
        &store,
        "--read-data",
    ]);
    let zip = dir.join("s1/manager.zip");
    let mut bytes = std::fs::read(&zip).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&zip, bytes).unwrap();
    let out = sb.run(&[
        "snapshots",
        "verify",
        "s1",
        "--store",
        &store,
        "--read-data",
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).0.contains("manager.zip"), "{:?}", text(&out));
}

#[test]
fn recover_needs_force_and_rebuilds_manager_and_nodes_at_new_locations() {
    let sb = Sandbox::new();
    let (src, state) = cluster_with_manager(&sb, 10_000);
    let dir = sb.path("backups");
    let store = format!("file://{}", dir.display());
    for snap in ["older", "newer"] {
        sb.ok(&[
            "plan",
            "start",
            "backup-local",
            "--cluster",
            s(&src),
            "-p",
            &format!("SNAPSHOT_NAME={snap}"),
            "-p",
            &format!("BACKUP_DIR={}", dir.display()),
        ]);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The newest snapshot lost an object: recover passes over it.
    std::fs::remove_file(dir.join("newer/node-1.tar.gz")).unwrap();

    // The manager's machine is gone; a new description names new places.
    let new_state = sb.path("rebuilt/mgr");
    let nodes: Vec<(u32, PathBuf)> = (0..2)
        .map(|i| (i, sb.path(&format!("tgt/node-{i}"))))
        .collect();
    let nc = manager_cluster(&sb, "tgt", &new_state, "2.3.0", "", &nodes);
    let out = sb.run(&["recover", "--store", &store, "--cluster", s(&nc), "--nodes"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("recover from snapshot older"), "{stdout}");
    assert!(
        stdout.contains("passed over newer snapshot newer"),
        "{stdout}"
    );
    assert!(stderr.contains("--force"), "{stderr}");
    assert!(
        !new_state.exists() && !sb.path("tgt").exists(),
        "nothing changed without --force"
    );

    sb.ok(&[
        "recover",
        "--force",
        "--store",
        &store,
        "--cluster",
        s(&nc),
        "--nodes",
    ]);
    assert_eq!(
        files(&new_state),
        without_prefix(files(&state), "credentials/")
    );
    assert_restored(&sb, "tgt", 2);
}

#[test]
fn cairns_own_state_is_the_manager_without_a_manager_section() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 1_000);
    let dir = sb.path("backups");
    sb.ok(&[
        "plan",
        "start",
        "backup-local",
        "--cluster",
        s(&src),
        "-p",
        "SNAPSHOT_NAME=a",
        "-p",
        &format!("BACKUP_DIR={}", dir.display()),
    ]);
    let store = store_url(&sb);
    sb.ok(&ms("create", "own", &store, s(&src), &[]));
    // A fresh home (a new machine) gets the run history back.
    let fresh = sb.path("home2");
    let out = sb
        .command(&ms("restore", "own", &store, s(&src), &[]))
        .env("CAIRN_HOME", &fresh)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        std::fs::read(fresh.join("cluster.toml")).unwrap(),
        std::fs::read(&src).unwrap()
    );
    let hist = sb
        .command(&["plan", "history", "--json"])
        .env("CAIRN_HOME", &fresh)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&hist.stdout).contains("backup-local"),
        "{:?}",
        text(&hist)
    );
    // The home that made it is not clean: restoring over it needs --force.
    let out = sb.run(&ms("restore", "own", &store, s(&src), &[]));
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    // A declared manager's snapshot never lands in cairn's home (a forgotten
    // --cluster), even forced.
    let mstate = sb.path("mgr/state");
    fill_manager(&mstate);
    let mc = manager_cluster(&sb, "m", &mstate, "0.0.1", "", &[]);
    sb.ok(&ms("create", "declared", &store, s(&mc), &[]));
    let other = sb.path("home3");
    let out = sb
        .command(&[
            "manager-snapshot",
            "restore",
            "declared",
            "--force",
            "--store",
            &store,
        ])
        .env("CAIRN_HOME", &other)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("--cluster"), "{:?}", text(&out));
    assert!(!other.exists());
}

#[test]
fn a_backup_refuses_up_front_when_the_manager_state_dir_is_missing() {
    let sb = Sandbox::new();
    let (src, state) = cluster_with_manager(&sb, 1000);
    std::fs::remove_dir_all(&state).unwrap();
    let dir = sb.path("backups");
    let out = sb.run(&[
        "plan",
        "start",
        "backup-local",
        "--cluster",
        s(&src),
        "-p",
        "SNAPSHOT_NAME=s",
        "-p",
        &format!("BACKUP_DIR={}", dir.display()),
    ]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("manager state dir"),
        "{:?}",
        text(&out)
    );
    assert!(
        !dir.join("s").exists(),
        "a node was backed up before the refusal"
    );
}

#[test]
fn a_failed_node_commit_puts_the_restored_manager_back() {
    let sb = Sandbox::new();
    let (src, _) = cluster_with_manager(&sb, 3 << 20);
    let dir = sb.path("backups");
    let backup = [
        "plan".to_string(),
        "start".into(),
        "backup-local".into(),
        "--cluster".into(),
        s(&src).into(),
        "-p".into(),
        "SNAPSHOT_NAME=s1".into(),
        "-p".into(),
        format!("BACKUP_DIR={}", dir.display()),
    ];
    sb.ok(&backup.iter().map(String::as_str).collect::<Vec<_>>());
    // A target whose manager holds state of its own (restored over with force).
    let tstate = sb.path("tmgr/state");
    write(&tstate.join("db/mine.json"), b"target's own", 0o644);
    let before = files(&tstate);
    let nodes: Vec<(u32, PathBuf)> = (0..2)
        .map(|i| (i, sb.path(&format!("tgt/node-{i}"))))
        .collect();
    let tc = manager_cluster(&sb, "tgt", &tstate, "2.4.0", "", &nodes);
    let restore = [
        "plan".to_string(),
        "start".into(),
        "restore-local".into(),
        "--cluster".into(),
        s(&tc).into(),
        "-p".into(),
        "SNAPSHOT_NAME=s1".into(),
        "-p".into(),
        format!("BACKUP_DIR={}", dir.display()),
        "-p".into(),
        "RESTORE_MANAGER=force".into(),
        "-p".into(),
        "MAX_BANDWIDTH=2MiB/s".into(),
        "-q".into(),
    ];
    let mut child = sb
        .command(&restore.iter().map(String::as_str).collect::<Vec<_>>())
        .spawn()
        .unwrap();
    crate::it::helpers::wait_until_running(&sb, 2, "stage/stage-node/node-0");
    // While the nodes stage, someone creates a keyspace the restore brings: the
    // commit must refuse, after the manager was already swapped in.
    std::fs::create_dir_all(sb.path("tgt/node-1/app")).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert_eq!(files(&tstate), before, "the manager's own state is back");
    let out = sb.ok(&["plan", "status", "2", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let step = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "commit/restore-manager")
        .unwrap()
        .clone();
    assert_eq!(
        step["status"], "PENDING",
        "a resume restores the manager again"
    );
    assert_eq!(
        std::fs::read_dir(sb.path("tgt/node-1")).unwrap().count(),
        1,
        "only the intruder"
    );
}

/// `recover --nodes` onto nodes reached with `exec`, from a store named by a
/// profile on a real S3 server: the node probes get the profile's options (they
/// were sent none), and the manager and nodes are rebuilt.
#[test]
fn recover_onto_exec_nodes_from_an_s3_profile() {
    use crate::it::servers::{self, AK, SK};
    let data = tempfile::tempdir().unwrap();
    let Some(server) = servers::s3s_fs(data.path(), 0) else {
        return;
    };
    let sb = Sandbox::new();
    let bucket = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(servers::fresh_bucket(&server.endpoint));
    std::fs::write(sb.path("aws-secret"), format!("{SK}\n")).unwrap();
    std::fs::write(
        sb.path("cairn.toml"),
        format!(
            "[stores.prod]\nurl = \"s3://{bucket}/p\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\naccess_key_id = \"{AK}\"\nsecret_access_key_file = \"aws-secret\"\n",
            server.endpoint
        ),
    )
    .unwrap();
    let (src, state) = cluster_with_manager(&sb, 10_000);
    sb.ok(&[
        "plan",
        "start",
        "backup-s3",
        "-q",
        "--cluster",
        s(&src),
        "-p",
        "SNAPSHOT_NAME=s1",
        "-p",
        "STORE=prod",
    ]);
    let bin = super::nodes::agent_bin(&sb);
    let new_state = sb.path("rebuilt/mgr");
    let mut t = format!("name = \"tgt\"\nagent_path = {bin:?}\n");
    for i in 0..2 {
        t.push_str(&format!(
            "[[nodes]]\nindex = {i}\ndata_dir = {:?}\nexec = [\"env\", \"X=1\"]\n",
            sb.path(&format!("tgt/node-{i}"))
        ));
    }
    t.push_str(&format!(
        "[manager]\nstate_dir = {new_state:?}\nversion = \"2.3.0\"\n"
    ));
    let nc = sb.path("tgt.toml");
    std::fs::write(&nc, t).unwrap();
    let out = sb.run(&[
        "recover",
        "--force",
        "--store",
        "prod",
        "--cluster",
        s(&nc),
        "--nodes",
    ]);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(!o.contains(SK) && !e.contains(SK));
    assert_eq!(
        files(&new_state),
        without_prefix(files(&state), "credentials/")
    );
    assert_restored(&sb, "tgt", 2);
}
