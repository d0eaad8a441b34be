//! `echo`: the example service. Republishes every JSON message it receives as its success
//! message; used by the framework's tests and the benchmark.

use framework::config::{Config, ConfigError};
use framework::{BoxError, MessageContext, MessageProcessor, Outcome, Service, async_trait};
use serde::{Deserialize, Serialize};

/// `[echo]` keys besides queue/output_exchange/http_listen.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct EchoSettings {
    routing_keys: Vec<String>,
    output_routing_key: String,
    /// Artificial handling time per message (tests and benchmarks of draining).
    #[serde(default)]
    delay_ms: u64,
    /// A routing key whose messages make the handler panic with the input's text (a JSON
    /// string): tests of a real process's panic path.
    #[serde(default)]
    panic_key: String,
}

struct Echo {
    delay: std::time::Duration,
    panic_key: String,
}

#[async_trait]
impl MessageProcessor for Echo {
    type Input = serde_json::Value;
    async fn handle(&self, input: serde_json::Value, ctx: &MessageContext) -> Outcome {
        if !self.panic_key.is_empty() && ctx.routing_key == self.panic_key {
            panic!("{}", input.as_str().unwrap_or("asked to"));
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        // The decoded value moves into the outcome: `Outcome::success` would serialise it
        // into a copy first.
        Outcome::Success {
            body: input,
            extra: Vec::new(),
            identity: None,
        }
    }
}

struct EchoService;

#[async_trait]
impl Service for EchoService {
    const NAME: &'static str = "echo";
    const ABOUT: &'static str = "example service: republishes every JSON message it receives";
    const SECTION: &'static str = "echo";
    type Settings = EchoSettings;
    type Processor = Echo;

    fn binding(cfg: &Config<EchoSettings>) -> framework::Binding {
        framework::Binding {
            exchange: "storagetier-echo-in".to_string(),
            routing_keys: cfg.settings.routing_keys.clone(),
            output_routing_key: cfg.settings.output_routing_key.clone(),
            ..Default::default()
        }
    }

    fn validate_topology(cfg: &Config<EchoSettings>) -> Result<(), ConfigError> {
        if cfg.settings.routing_keys.is_empty() {
            return Err(ConfigError::new(
                "echo.routing_keys",
                "needs at least one key",
            ));
        }
        Ok(())
    }

    async fn processor(cfg: &Config<EchoSettings>) -> Result<Echo, BoxError> {
        Ok(Echo {
            delay: std::time::Duration::from_millis(cfg.settings.delay_ms),
            panic_key: cfg.settings.panic_key.clone(),
        })
    }
}

framework::service_main!(EchoService);
