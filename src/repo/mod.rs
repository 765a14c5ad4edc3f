//! The repository: which objects each snapshot needs, the parent a differential
//! backup builds on, and delete by reachability.
//!
//! A differential snapshot references objects of earlier snapshots (its
//! manifest's `references`). Deleting a snapshot therefore deletes only what no
//! kept snapshot needs: mark (every complete manifest's own objects and
//! references) and sweep (the deleted snapshot's objects, and the objects it
//! referenced in folders that no longer have a manifest). What is still needed
//! stays in the deleted snapshot's folder, without a manifest: such a folder is
//! listed as holding objects for others, never restored, never reused for a new
//! snapshot, and swept when its last referrer goes.
//!
//! Crash safety: before anything is deleted a record `.cairn-gc/<name>.json`
//! says what is being deleted and which referenced objects to look at; it is
//! removed last. A delete or prune that finds a record finishes that work first,
//! so a killed collection is finished by the next run. The mark is taken after
//! the manifest is gone, from every manifest in the store, and a manifest that
//! cannot be read stops the sweep: nothing a kept snapshot references is deleted.

pub mod layout;

pub use layout::*;

use crate::manifest::Manifest;
use crate::store::Store;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What a collection is about to delete, recorded before it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    snapshot: String,
    /// SHA-256 of the manifest being deleted (its bytes), if it had one: a
    /// manifest found there later with other bytes is a new snapshot of the same
    /// name, never deleted by this record.
    #[serde(default)]
    manifest_sha256: Option<String>,
    /// Objects of other folders the snapshot referenced (from the store's root).
    referenced: Vec<String>,
    at: String,
}

/// SHA-256 of a snapshot's manifest as stored, if it has one.
async fn manifest_bytes_digest(store: &dyn Store, name: &str) -> Result<Option<String>> {
    match crate::store::get_bytes(
        store,
        &key(name, MANIFEST),
        crate::manifest::MAX_MANIFEST_BYTES,
    )
    .await
    {
        Ok(b) => Ok(Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            &b,
        )))),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The snapshots of a store, read once: folders, their objects and the complete
/// manifests.
pub struct Catalog {
    /// Every object of the store, cairn's own records included, as listed.
    pub listing: Vec<crate::store::ObjectMeta>,
    /// Folder → its objects' keys (from the store's root).
    pub folders: BTreeMap<String, Vec<String>>,
    /// Complete snapshots, by name.
    pub manifests: BTreeMap<String, Manifest>,
    /// Folders with a manifest that could not be read, and why.
    pub unreadable: BTreeMap<String, String>,
}

impl Catalog {
    pub async fn load(store: &dyn Store) -> Result<Catalog> {
        let listing = store.list("").await?;
        let mut folders: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for o in &listing {
            let Some((name, _)) = o.key.split_once('/') else {
                continue;
            };
            if reserved(name) {
                continue;
            }
            folders
                .entry(name.to_string())
                .or_default()
                .push(o.key.clone());
        }
        let mut manifests = BTreeMap::new();
        let mut unreadable = BTreeMap::new();
        for (name, keys) in &folders {
            if !keys.contains(&key(name, MANIFEST)) {
                continue;
            }
            match crate::checks::read_manifest(store, name).await {
                Ok(m) => {
                    manifests.insert(name.clone(), m);
                }
                Err(Error::NotFound(_)) => {}
                Err(e) => {
                    unreadable.insert(name.clone(), e.to_string());
                }
            }
        }
        Ok(Catalog {
            listing,
            folders,
            manifests,
            unreadable,
        })
    }

    /// Object key → the complete snapshots that need it.
    pub fn needed(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, m) in &self.manifests {
            for k in m.needs() {
                out.entry(k).or_default().insert(name.clone());
            }
        }
        out
    }

    /// The objects of `folder` (which has no manifest) that complete snapshots
    /// reference, each with those snapshots.
    pub fn held_for(&self, folder: &str) -> Vec<(String, Vec<String>)> {
        self.held_with(&self.needed(), folder)
    }

    /// [`Catalog::held_for`] with the mark ([`Catalog::needed`]) worked out once.
    pub fn held_with(
        &self,
        needed: &BTreeMap<String, BTreeSet<String>>,
        folder: &str,
    ) -> Vec<(String, Vec<String>)> {
        if self.manifests.contains_key(folder) || self.unreadable.contains_key(folder) {
            return Vec::new();
        }
        self.folders
            .get(folder)
            .into_iter()
            .flatten()
            .filter_map(|k| {
                needed
                    .get(k)
                    .map(|by| (k.clone(), by.iter().cloned().collect()))
            })
            .collect()
    }
}

/// Why a differential backup cannot build on a snapshot (it is then full).
pub fn unfit_parent(m: &Manifest, full_every: u32) -> Option<String> {
    if m.encryption.is_some() {
        return Some(format!(
            "the newest snapshot, {:?}, is encrypted",
            m.snapshot
        ));
    }
    if m.format_version < 2 {
        return Some(format!(
            "the newest snapshot, {:?}, is of format {} (no block index)",
            m.snapshot, m.format_version
        ));
    }
    if full_every > 0 && m.differentials >= full_every {
        return Some(format!(
            "FULL_EVERY={full_every}: {:?} was the {}th differential in a row",
            m.snapshot, m.differentials
        ));
    }
    None
}

/// The parent of a differential backup of `cluster` into `snapshot`: the newest
/// complete snapshot of that cluster (by its finish time), or why there is none
/// to build on. Manifests are read newest first by their objects' times, and
/// only until the newest of the cluster is known: a manifest is written after
/// its finish time, so one whose object is older than the best finish time found
/// (less a margin for clocks) cannot be newer. A pre-flight does not read every
/// manifest of a store, and a copied or touched old manifest is not taken for
/// the newest.
async fn choose_parent(
    store: &dyn Store,
    listing: &[crate::store::ObjectMeta],
    cluster: &str,
    snapshot: &str,
    full_every: u32,
) -> Result<std::result::Result<Manifest, String>> {
    let mut candidates: Vec<(&str, i64)> = listing
        .iter()
        .filter_map(|o| {
            let (folder, rest) = o.key.split_once('/')?;
            (rest == MANIFEST && !reserved(folder) && folder != snapshot)
                .then_some((folder, o.modified.unwrap_or(i64::MAX)))
        })
        .collect();
    candidates.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(a.0)));
    let finished = |m: &Manifest| {
        chrono::DateTime::parse_from_rfc3339(&m.finished_at)
            .map(|t| t.timestamp_millis())
            .unwrap_or(i64::MIN)
    };
    /// How far the store's clock may be behind the writer's, in seconds.
    const CLOCKS: i64 = 300;
    let mut newest: Option<Manifest> = None;
    for (folder, modified) in candidates {
        if newest
            .as_ref()
            .is_some_and(|n| modified < (finished(n) / 1000).saturating_sub(CLOCKS))
        {
            break;
        }
        let m = match crate::checks::read_manifest(store, folder).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(snapshot = folder, "not a parent: {e}");
                continue;
            }
        };
        if m.cluster.name != cluster {
            continue;
        }
        if newest.as_ref().is_none_or(|n| {
            (finished(&m), m.snapshot.as_str()) > (finished(n), n.snapshot.as_str())
        }) {
            newest = Some(m);
        }
    }
    Ok(match newest {
        None => Err(format!(
            "no complete snapshot of cluster {cluster:?} in the store"
        )),
        Some(m) => match unfit_parent(&m, full_every) {
            Some(why) => Err(why),
            None => Ok(m),
        },
    })
}

/// What a backup into `snapshot` of `cluster` builds on: `Ok(parent)` for a
/// differential, `Err(why)` for a full backup. Refused (exit 3) when the name's
/// folder holds objects other snapshots need (every manifest is read only then).
pub async fn backup_base(
    store: &dyn Store,
    cluster: &str,
    snapshot: &str,
    differential: bool,
    encrypted: bool,
    full_every: u32,
) -> Result<std::result::Result<Manifest, String>> {
    let listing = store.list("").await?;
    if listing.iter().any(|o| folder_of(&o.key) == snapshot) {
        let catalog = Catalog::load(store).await?;
        let held = catalog.held_for(snapshot);
        if let Some((_, by)) = held.first() {
            return Err(Error::Checks(vec![format!(
                "the folder {snapshot:?} in {} still holds {} object(s) that {} reference (a deleted snapshot's unchanged files): choose another SNAPSHOT_NAME",
                store.describe(),
                held.len(),
                by.join(", ")
            )]));
        }
    }
    if !differential {
        return Ok(Err("MODE=full".to_string()));
    }
    if encrypted {
        return Ok(Err("an encrypted backup is always full".to_string()));
    }
    choose_parent(store, &listing, cluster, snapshot, full_every).await
}

/// What a delete did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Deleted {
    pub snapshot: String,
    /// Objects deleted.
    pub deleted: usize,
    /// Objects kept because other snapshots need them, with those snapshots.
    pub kept: Vec<(String, Vec<String>)>,
    /// Deletes an earlier, interrupted run left unfinished, finished first.
    pub finished: Vec<String>,
    /// The sweep was left for later: this backup was running (it may build on
    /// what the sweep would take).
    pub deferred: Option<String>,
}

/// Delete a snapshot by reachability (see the module): its manifest first, so it
/// is never restored half-deleted, then every object of it, or that it alone
/// referenced, that no complete snapshot needs.
pub async fn delete(store: &dyn Store, name: &str) -> Result<Deleted> {
    crate::spec::check_snapshot_name(name).map_err(Error::Usage)?;
    // Unfinished deletes first; one that cannot finish (another manifest does
    // not read) does not stop this one, which may be of that very snapshot.
    let mut finished = match finish_pending(store).await {
        Ok(f) => f,
        Err(Error::Refused(why)) => {
            tracing::warn!(
                "an earlier delete cannot be finished yet: {}",
                why.join("; ")
            );
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let objects = store.list(&folder(name)).await?;
    if objects.is_empty() {
        return Err(Error::NotFound(format!(
            "snapshot {name:?} in {}",
            store.describe()
        )));
    }
    // Nothing changes unless the sweep can tell what every other snapshot needs.
    unreadable_others(&Catalog::load(store).await?, name)?;
    let manifest_key = key(name, MANIFEST);
    // What it referenced: looked at again once it is gone (a clear part holds
    // the references of an encrypted manifest too).
    let referenced = match objects.iter().any(|o| o.key == manifest_key) {
        true => match crate::checks::read_manifest(store, name).await {
            Ok(m) => m.references.iter().map(|r| r.key.clone()).collect(),
            Err(_) => Vec::new(),
        },
        false => Vec::new(),
    };
    let pending = Pending {
        snapshot: name.to_string(),
        manifest_sha256: manifest_bytes_digest(store, name).await?,
        referenced,
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    let mut done = collect(store, &pending).await?;
    // The delete of an unreadable snapshot may have unblocked an earlier one.
    if let Ok(more) = finish_pending(store).await {
        finished.extend(more);
    }
    done.finished = finished;
    Ok(done)
}

/// Refused when a complete snapshot other than `name` has a manifest that does
/// not read: what it references is unknown, so nothing may be swept.
fn unreadable_others(catalog: &Catalog, name: &str) -> Result<()> {
    let names: Vec<&str> = catalog
        .unreadable
        .keys()
        .map(String::as_str)
        .filter(|n| *n != name)
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    Err(Error::Refused(vec![format!(
        "the manifest of {} cannot be read, so what it references is unknown: nothing of {name:?} was deleted (delete or repair that snapshot first)",
        names.join(", ")
    )]))
}

/// Finish the deletes that killed runs left (their records), oldest first.
pub async fn finish_pending(store: &dyn Store) -> Result<Vec<String>> {
    let mut finished = Vec::new();
    if !crate::lock::live_backups(store, crate::lock::Settings::from_env())
        .await?
        .is_empty()
    {
        return Ok(finished);
    }
    for o in store.list(&format!("{GC}/")).await? {
        let bytes = crate::store::get_bytes(store, &o.key, 16 << 20).await?;
        let pending: Pending = match serde_json::from_slice(&bytes) {
            Ok(p) if gc_key_matches(&o.key, &p) => p,
            _ => {
                // Not a record this code wrote: left alone, said.
                tracing::warn!(key = %o.key, "an unreadable delete record is left alone");
                continue;
            }
        };
        tracing::info!(
            snapshot = %pending.snapshot,
            since = %pending.at,
            "finishing the delete an interrupted run left"
        );
        match collect(store, &pending).await {
            Ok(_) => finished.push(pending.snapshot),
            // A manifest that does not read: the record stays for a later run.
            Err(Error::State(why)) => tracing::warn!("{why}"),
            Err(e) => return Err(e),
        }
    }
    Ok(finished)
}

fn gc_key_matches(key: &str, p: &Pending) -> bool {
    crate::spec::check_snapshot_name(&p.snapshot).is_ok() && key == gc_key(&p.snapshot)
}

/// Record, delete the manifest, mark, sweep, remove the record.
async fn collect(store: &dyn Store, pending: &Pending) -> Result<Deleted> {
    let name = pending.snapshot.as_str();
    let record =
        serde_json::to_vec_pretty(pending).map_err(|e| Error::State(format!("gc record: {e}")))?;
    store.put(&gc_key(name), record.into()).await?;
    crate::failpoint::hit("gc:recorded")?;
    // Only the manifest this delete was asked for: one written since under the
    // same name (a new snapshot) stays, and so does everything it needs.
    let found = manifest_bytes_digest(store, name).await?;
    let had_manifest = found.is_some() && found == pending.manifest_sha256;
    if had_manifest {
        store.delete(&key(name, MANIFEST)).await?;
        if let Err(e) = store.delete(&verify_key(name)).await {
            tracing::warn!("could not remove the verification record: {e}");
        }
    } else if found.is_some() {
        tracing::info!(
            snapshot = name,
            "a complete snapshot of this name was written since its delete began: it is kept"
        );
    }
    crate::failpoint::hit("gc:manifest-deleted")?;
    // Before the mark: a backup that ends between this look and the mark is in
    // the mark; one still running defers the sweep; one that starts after it
    // cannot take the deleted manifest as its parent.
    //
    // A backup running now may be building on an object this sweep would take
    // (its manifest, naming it, is not written yet): the sweep waits for a
    // delete or prune that runs when no backup does. The snapshot is gone
    // already; only its space comes back later.
    let running = crate::lock::live_backups(store, crate::lock::Settings::from_env()).await?;
    if let Some(b) = running.first() {
        tracing::warn!(
            backup = %b.snapshot,
            "a backup is running: the objects of {name:?} are swept by the next delete or prune"
        );
        return Ok(Deleted {
            snapshot: name.to_string(),
            deleted: usize::from(had_manifest),
            deferred: Some(b.snapshot.clone()),
            ..Default::default()
        });
    }
    // Mark: everything every remaining complete snapshot needs.
    let catalog = Catalog::load(store).await?;
    if let Err(Error::Refused(why)) = unreadable_others(&catalog, name) {
        // Only when a manifest became unreadable since the delete began (or a
        // recorded delete is being finished): the snapshot is gone, its sweep
        // waits for the next delete or prune.
        return Err(Error::State(format!(
            "snapshot {name:?} is deleted, but its objects are not swept yet: {} (the next delete or prune finishes it)",
            why.join("; ")
        )));
    }
    let needed = catalog.needed();
    // Sweep: the snapshot's folder, and the folders without a manifest whose
    // objects it referenced.
    let mut candidates: BTreeSet<String> = catalog
        .folders
        .get(name)
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    for k in &pending.referenced {
        let folder = folder_of(k);
        if !catalog.manifests.contains_key(folder)
            && catalog.folders.get(folder).is_some_and(|f| f.contains(k))
        {
            candidates.insert(k.clone());
        }
    }
    let mut out = Deleted {
        snapshot: name.to_string(),
        deleted: usize::from(had_manifest),
        ..Default::default()
    };
    for k in candidates {
        match needed.get(&k) {
            Some(by) => out.kept.push((k, by.iter().cloned().collect())),
            None => {
                crate::failpoint::hit("gc:sweep")?;
                store.delete(&k).await?;
                out.deleted += 1;
            }
        }
    }
    store.delete(&gc_key(name)).await?;
    Ok(out)
}
