//! A plain upload of one file through cairn's own store client, the baseline the
//! end-to-end benchmarks divide by (the same bytes, the same client, no archiving):
//!
//!     cargo bench --bench put_object -- STORE_URL KEY FILE
//!     cargo bench --bench put_object -- create-container NAME   (Azurite set-up)
//!
//! Store options come from the environment as for `cairn snapshots` (e.g.
//! AZURE_STORAGE_ACCOUNT, AZURE_STORAGE_KEY, AZURE_ENDPOINT_URL). Prints MiB/s.

use bytes::Bytes;
use std::io::Read;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if let [cmd, name] = args.as_slice()
        && cmd == "create-container"
    {
        let env = |k: &str| std::env::var(k).unwrap_or_default();
        let creds = azure_storage::StorageCredentials::access_key(
            env("AZURE_STORAGE_ACCOUNT"),
            env("AZURE_STORAGE_KEY"),
        );
        let location = azure_storage::CloudLocation::Custom {
            account: env("AZURE_STORAGE_ACCOUNT"),
            uri: env("AZURE_ENDPOINT_URL"),
        };
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let r = rt.block_on(
            azure_storage_blobs::prelude::ClientBuilder::with_location(location, creds)
                .container_client(name)
                .create()
                .into_future(),
        );
        if let Err(e) = r {
            eprintln!("create-container: {e}");
            std::process::exit(1);
        }
        return;
    }
    let [url, key, file] = args.as_slice() else {
        eprintln!("usage: put_object STORE_URL KEY FILE");
        std::process::exit(2);
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let result = rt.block_on(async {
        let store = cairn::store::open(url, &cairn::cli::store_options_from_env()).await?;
        let len = std::fs::metadata(file)
            .map_err(|e| cairn::Error::io("stat", file, e))?
            .len();
        let part = cairn::store::part_size_for(store.limits(), len);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let path = file.clone();
        let producer = tokio::task::spawn_blocking(move || {
            let mut f =
                std::fs::File::open(&path).map_err(|e| cairn::Error::io("open", &path, e))?;
            loop {
                let mut buf = vec![0u8; part];
                let mut n = 0;
                while n < part {
                    let r = f
                        .read(&mut buf[n..])
                        .map_err(|e| cairn::Error::io("read", &path, e))?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                if tx.blocking_send(Bytes::from(buf)).is_err() {
                    return Ok(());
                }
            }
        });
        let producer = async {
            producer
                .await
                .map_err(|e| cairn::Error::State(e.to_string()))?
        };
        let start = Instant::now();
        let cancel = tokio_util::sync::CancellationToken::new();
        let (size, ()) =
            cairn::store::upload_parts(&*store, key, rx, part, producer, &cancel, |_| {}).await?;
        Ok::<_, cairn::Error>((size, start.elapsed()))
    });
    match result {
        Ok((size, t)) => println!(
            "{:.1} MiB/s ({size} bytes in {:.2} s)",
            size as f64 / (1 << 20) as f64 / t.as_secs_f64(),
            t.as_secs_f64()
        ),
        Err(e) => {
            eprintln!("put_object: {e}");
            std::process::exit(1);
        }
    }
}
