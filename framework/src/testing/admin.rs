//! The broker's management HTTP API, as the tests use it: closing connections and managing
//! users on whichever broker the suite runs against (`STORAGETIER_TEST_MGMT_URL`), so no
//! test depends on a `rabbitmqctl` of the broker's own version being on `PATH`.

use std::time::Duration;

use serde_json::Value;

/// Management API base URL with credentials (`STORAGETIER_TEST_MGMT_URL`, default the local
/// broker's `http://guest:guest@127.0.0.1:15672`).
pub fn mgmt_url() -> String {
    std::env::var("STORAGETIER_TEST_MGMT_URL")
        .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".into())
}

/// A client for the management API at `base` (`http://user:pass@host:port`).
#[derive(Debug, Clone)]
pub struct Admin {
    base: String,
    user: String,
    password: String,
    http: reqwest::Client,
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

impl Admin {
    /// The suite's broker (see [`mgmt_url`]).
    pub fn suite() -> Admin {
        Admin::at(&mgmt_url())
    }

    /// The management API at `url`.
    pub fn at(url: &str) -> Admin {
        let u = url::Url::parse(url).expect("a valid management URL");
        let base = format!(
            "{}://{}:{}",
            u.scheme(),
            u.host_str().unwrap_or("127.0.0.1"),
            u.port_or_known_default().unwrap_or(15672)
        );
        Admin {
            base,
            user: if u.username().is_empty() {
                "guest".into()
            } else {
                u.username().into()
            },
            password: u.password().unwrap_or("guest").into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}/api{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .header("x-reason", "closed by a test");
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("management API reachable at {}: {e}", self.base));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert!(
            status.is_success() || status == reqwest::StatusCode::NOT_FOUND,
            "{method} {path}: {status} {text}"
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Publishes through the management API with `headers_json` (JSON text, written by
    /// hand: headers nested deeper than a client library can encode on a normal stack)
    /// as the message's headers; true when it was routed.
    pub async fn publish_raw_headers(
        &self,
        exchange: &str,
        routing_key: &str,
        headers_json: &str,
        payload: &str,
    ) -> bool {
        let body = format!(
            "{{\"properties\":{{\"headers\":{headers_json}}},\"routing_key\":{},\"payload\":{},\"payload_encoding\":\"string\"}}",
            Value::from(routing_key),
            Value::from(payload)
        );
        let resp = self
            .http
            .post(format!(
                "{}/api/exchanges/%2F/{}/publish",
                self.base,
                encode(exchange)
            ))
            .basic_auth(&self.user, Some(&self.password))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("management API reachable at {}: {e}", self.base));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "publish: {status} {text}");
        text.contains("\"routed\":true")
    }

    /// The broker's version, e.g. `4.0.5`.
    pub async fn version(&self) -> String {
        let v = self.call(reqwest::Method::GET, "/overview", None).await;
        v["rabbitmq_version"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Closes every connection whose client-provided name is `name`; returns how many.
    /// A new connection reaches the API's list within the broker's stats interval, so this
    /// waits (at most 30 s) until at least one shows.
    pub async fn close_connections_named(&self, name: &str) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let names = loop {
            let list = self
                .call(
                    reqwest::Method::GET,
                    "/connections?columns=name,client_properties.connection_name",
                    None,
                )
                .await;
            let names: Vec<String> = list
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["client_properties"]["connection_name"] == name)
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect();
            if !names.is_empty() || tokio::time::Instant::now() >= deadline {
                break names;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for n in &names {
            self.call(
                reqwest::Method::DELETE,
                &format!("/connections/{}", encode(n)),
                None,
            )
            .await;
        }
        names.len()
    }

    /// Adds a user with full permissions on vhost `/`; deleted when the guard drops.
    pub async fn add_user(&self, user: &str, password: &str) -> TestUser {
        self.add_user_configuring(user, password, ".*").await
    }

    /// Adds a user on vhost `/` who may read and write anything but configure (declare)
    /// only what matches `configure` (`^$`: nothing); deleted when the guard drops.
    pub async fn add_user_configuring(
        &self,
        user: &str,
        password: &str,
        configure: &str,
    ) -> TestUser {
        self.add_user_with(user, password, configure, ".*").await
    }

    /// Adds a user on vhost `/` who may read anything, configure what matches `configure`
    /// and write (publish) to what matches `write`; deleted when the guard drops.
    pub async fn add_user_with(
        &self,
        user: &str,
        password: &str,
        configure: &str,
        write: &str,
    ) -> TestUser {
        self.call(
            reqwest::Method::PUT,
            &format!("/users/{}", encode(user)),
            Some(serde_json::json!({"password": password, "tags": ""})),
        )
        .await;
        self.set_permissions(user, configure, write).await;
        TestUser {
            admin: self.clone(),
            user: user.to_string(),
        }
    }

    /// Changes `user`'s password (a credential rotated); connections open stay open.
    pub async fn set_password(&self, user: &str, password: &str) {
        self.call(
            reqwest::Method::PUT,
            &format!("/users/{}", encode(user)),
            Some(serde_json::json!({"password": password, "tags": ""})),
        )
        .await;
    }

    /// Sets what `user` may configure and write on vhost `/` (read: anything).
    pub async fn set_permissions(&self, user: &str, configure: &str, write: &str) {
        self.call(
            reqwest::Method::PUT,
            &format!("/permissions/%2F/{}", encode(user)),
            Some(serde_json::json!({"configure": configure, "write": write, "read": ".*"})),
        )
        .await;
    }

    /// Sets policy `name` on vhost `/` for the queues matching `pattern`, with the
    /// highest priority; removed when the guard drops.
    pub async fn set_policy(&self, name: &str, pattern: &str, definition: Value) -> TestPolicy {
        self.call(
            reqwest::Method::PUT,
            &format!("/policies/%2F/{}", encode(name)),
            Some(
                serde_json::json!({"pattern": pattern, "definition": definition,
                                    "priority": 999, "apply-to": "queues"}),
            ),
        )
        .await;
        TestPolicy {
            admin: self.clone(),
            name: Some(name.to_string()),
        }
    }

    /// The policy in effect on queue `name` of vhost `/`, if any.
    pub async fn queue_policy(&self, name: &str) -> Option<String> {
        let q = self
            .call(
                reqwest::Method::GET,
                &format!("/queues/%2F/{}?columns=policy", encode(name)),
                None,
            )
            .await;
        q["policy"].as_str().map(str::to_string)
    }

    /// The consumers of queue `name` on vhost `/` as the broker shows them (`consumer_details`:
    /// `prefetch_count`, `arguments`…), waiting up to [`crate::testing::WAIT`] for at least
    /// one to show.
    pub async fn consumers(&self, name: &str) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + crate::testing::WAIT;
        loop {
            let q = self
                .call(
                    reqwest::Method::GET,
                    &format!("/queues/%2F/{}?columns=consumer_details", encode(name)),
                    None,
                )
                .await;
            let list = q["consumer_details"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !list.is_empty() || tokio::time::Instant::now() > deadline {
                return list;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Waits up to [`crate::testing::WAIT`] for queue `name` on vhost `/` to hold no
    /// message, ready or delivered and unacknowledged (a ready count alone reads 0 for a
    /// message a consumer holds unsettled); false if it still holds some then. The
    /// management API's figures are up to 5 s old: call it once the message has been held
    /// longer than that (a 0 from before its publish would read as settled).
    pub async fn await_settled(&self, name: &str) -> bool {
        let deadline = tokio::time::Instant::now() + crate::testing::WAIT;
        loop {
            let q = self
                .call(
                    reqwest::Method::GET,
                    &format!("/queues/%2F/{}?columns=messages", encode(name)),
                    None,
                )
                .await;
            if q["messages"].as_u64() == Some(0) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Names of queues on vhost `/` starting with `prefix`.
    pub async fn queues_starting_with(&self, prefix: &str) -> Vec<String> {
        let list = self
            .call(reqwest::Method::GET, "/queues/%2F?columns=name", None)
            .await;
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|q| q["name"].as_str())
            .filter(|n| n.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }
}

/// A policy that exists until dropped (or [`TestPolicy::remove`]d).
#[derive(Debug)]
pub struct TestPolicy {
    admin: Admin,
    name: Option<String>,
}

impl TestPolicy {
    /// Removes the policy now.
    pub async fn remove(mut self) {
        if let Some(name) = self.name.take() {
            self.admin
                .call(
                    reqwest::Method::DELETE,
                    &format!("/policies/%2F/{}", encode(&name)),
                    None,
                )
                .await;
        }
    }
}

impl Drop for TestPolicy {
    fn drop(&mut self) {
        let Some(name) = self.name.take() else {
            return;
        };
        self.admin
            .delete_from_drop(format!("/policies/%2F/{}", encode(&name)));
    }
}

/// A broker user that exists until dropped.
#[derive(Debug)]
pub struct TestUser {
    admin: Admin,
    user: String,
}

impl Drop for TestUser {
    fn drop(&mut self) {
        self.admin
            .delete_from_drop(format!("/users/{}", encode(&self.user)));
    }
}

impl Admin {
    /// Deletes `path` of the API (`/users/u`), from a guard's `Drop`: on a thread and
    /// client of its own — the admin's pooled connections belong to the test's runtime
    /// and would hang there until their timeout.
    fn delete_from_drop(&self, path: String) {
        let admin = self.clone();
        super::run_on_own_thread(async move {
            let _ = reqwest::Client::new()
                .delete(format!("{}/api{path}", admin.base))
                .basic_auth(&admin.user, Some(&admin.password))
                .send()
                .await;
        });
    }

    /// Adds vhost `name` (guest may use it) holding at most `max_queues` queues; deleted,
    /// with everything in it, when the guard drops.
    pub async fn add_vhost_limited(&self, name: &str, max_queues: u32) -> TestVhost {
        self.call(
            reqwest::Method::PUT,
            &format!("/vhosts/{}", encode(name)),
            Some(serde_json::json!({})),
        )
        .await;
        self.call(
            reqwest::Method::PUT,
            &format!("/permissions/{}/{}", encode(name), encode(&self.user)),
            Some(serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"})),
        )
        .await;
        self.call(
            reqwest::Method::PUT,
            &format!("/vhost-limits/{}/max-queues", encode(name)),
            Some(serde_json::json!({"value": max_queues})),
        )
        .await;
        TestVhost {
            admin: self.clone(),
            name: name.to_string(),
        }
    }
}

/// A vhost that exists until dropped.
#[derive(Debug)]
pub struct TestVhost {
    admin: Admin,
    name: String,
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        self.admin
            .delete_from_drop(format!("/vhosts/{}", encode(&self.name)));
    }
}
