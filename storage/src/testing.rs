//! Test support for the storage services: a local S3-protocol server (moto, from PyPI)
//! and helpers to build asset-sweeper messages.

use std::net::TcpListener;
use std::process::{Command, Stdio};

use framework::testing::process::{self, Guarded};
use std::time::Duration;

/// A moto S3 server on a free loopback port, killed on drop.
pub struct MotoServer {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    port: u16,
    child: Option<Guarded>,
}

impl MotoServer {
    /// Starts `moto_server` and creates `bucket`.
    pub async fn start(bucket: &str) -> MotoServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut s = MotoServer {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            child: None,
        };
        s.restart(bucket).await;
        s
    }

    /// Stops the server (the store is then "down").
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// Starts it again on the same port (moto keeps nothing: the bucket is re-created).
    pub async fn restart(&mut self, bucket: &str) {
        self.stop();
        let child = process::spawn(
            Command::new(python())
                .args([
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("python3 -m moto.server runs (pip install 'moto[server]')");
        self.child = Some(child);
        let client = reqwest_client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client
                .put(format!("{}/{bucket}", self.endpoint))
                .send()
                .await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "moto_server came up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl MotoServer {
    /// Store options reaching this server (moto accepts any credentials).
    pub fn store_options(&self) -> crate::StoreOptions {
        crate::StoreOptions {
            endpoint: Some(self.endpoint.clone()),
            access_key_id: Some("test".into()),
            secret_access_key: Some(framework::Secret::new("test")),
            allow_http: true,
            ..Default::default()
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Python that has moto installed (`MOTO_PYTHON`, default `python3`).
fn python() -> String {
    std::env::var("MOTO_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn reqwest_client() -> reqwest::Client {
    reqwest::Client::new()
}

/// An asset-sweeper message for `parent_dir/filename`, in the shape the sweeper sends
/// (`parent_dir`, times as epoch seconds, some fractional).
pub fn sweeper_message(parent_dir: &str, filename: &str, ignore: bool) -> serde_json::Value {
    serde_json::json!({
        "imported_id": "VX-1234",
        "size": 0,
        "ignore": ignore,
        "mime_type": "video/quicktime",
        "mtime": 1704067200,
        "ctime": 1704067200.25,
        "atime": 1704067201.5,
        "owner": 1000,
        "group": 1000,
        "parent_dir": parent_dir,
        "filename": filename,
    })
}

/// The same message in the older shape (`filepath`, RFC 3339 times), still accepted.
pub fn sweeper_message_v1(filepath: &str, filename: &str, ignore: bool) -> serde_json::Value {
    serde_json::json!({
        "imported_id": "VX-1234",
        "size": 0,
        "ignore": ignore,
        "mime_type": "video/quicktime",
        "mtime": "2024-01-01T00:00:00Z",
        "ctime": "2024-01-01T00:00:00Z",
        "atime": "2024-01-01T00:00:00Z",
        "owner": 1000,
        "group": 1000,
        "filepath": filepath,
        "filename": filename,
    })
}

/// Writes `content` to `<data>/online/<rel>` (the default online root) and returns the
/// file's directory, as an asset-sweeper message's `parent_dir`.
pub fn put_online_file(data: &std::path::Path, rel: &str, content: &[u8]) -> String {
    let p = data.join("online").join(rel);
    let dir = p.parent().unwrap_or(data).to_path_buf();
    std::fs::create_dir_all(&dir).expect("create the online directory");
    std::fs::write(&p, content).expect("write the online file");
    dir.display().to_string()
}
