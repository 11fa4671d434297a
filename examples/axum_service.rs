//! Embedding the engine in a small axum service: `POST /orders` starts a workflow whose run id
//! is the request's `Idempotency-Key` header (a retried request finds the same run, never a
//! second one) and answers the id; `GET /orders/{id}` answers the run's status and output.
//!
//! ```text
//! cargo run --example axum_service                 # serves, makes a few requests, exits
//! cargo run --example axum_service -- --serve 127.0.0.1:3000 [DATA_DIR]
//! curl -X POST -H 'Idempotency-Key: order-1' -d '{"item":"bolt","quantity":3}' localhost:3000/orders
//! curl localhost:3000/orders/order-1
//! ```

// An example prints what it does: that is what a reader runs it for.
#![allow(clippy::print_stdout)]

use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel::{
    Compensation, Ctx, Engine, EngineError, Step, StepContext, StepError, Workflow, WorkflowError,
};
use serde::{Deserialize, Serialize};

/// Reserves stock; undone by releasing it.
#[derive(Serialize, Deserialize)]
struct Reserve {
    item: String,
    quantity: u32,
}

impl Step for Reserve {
    const KIND: &'static str = "shop.reserve";
    type Output = String;

    async fn execute(&self, ctx: &StepContext) -> Result<String, StepError> {
        // A real step passes ctx.key() to the stock service as its idempotency token.
        Ok(format!(
            "{}x{}-{}",
            self.quantity,
            self.item,
            &ctx.key().to_string()[..8]
        ))
    }

    async fn compensate(
        &self,
        _: &StepContext,
        _: Option<String>,
    ) -> Result<Compensation, StepError> {
        Ok(Compensation::Done)
    }
}

/// Charges the order; no undo needed in this sketch.
#[derive(Serialize, Deserialize)]
struct Charge {
    cents: u64,
}

impl Step for Charge {
    const KIND: &'static str = "shop.charge";
    type Output = u64;

    async fn execute(&self, _: &StepContext) -> Result<u64, StepError> {
        Ok(self.cents)
    }
}

#[derive(Serialize, Deserialize)]
struct Order {
    item: String,
    quantity: u32,
}

#[derive(Serialize, Deserialize)]
struct Placed {
    reservation: String,
    charged_cents: u64,
}

struct PlaceOrder;

impl Workflow for PlaceOrder {
    const NAME: &'static str = "shop.place-order";
    type Input = Order;
    type Output = Placed;

    async fn run(ctx: &mut Ctx, order: Order) -> Result<Placed, WorkflowError> {
        let reservation = ctx
            .step(Reserve {
                item: order.item.clone(),
                quantity: order.quantity,
            })
            .await?;
        let charged_cents = ctx
            .step(Charge {
                cents: 250 * u64::from(order.quantity),
            })
            .await?;
        Ok(Placed {
            reservation,
            charged_cents,
        })
    }
}

type Reply = (StatusCode, Json<serde_json::Value>);

fn error(status: StatusCode, e: impl ToString) -> Reply {
    (status, Json(serde_json::json!({"error": e.to_string()})))
}

async fn place(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    Json(order): Json<Order>,
) -> Reply {
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the Idempotency-Key header is required",
        );
    };
    match engine.start::<PlaceOrder>(key, order).await {
        Ok(run) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"id": run.id()})),
        ),
        Err(e @ EngineError::IdempotencyMismatch { .. }) => error(StatusCode::CONFLICT, e),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn status(State(engine): State<Arc<Engine>>, Path(id): Path<String>) -> Reply {
    match engine.status(&id).await {
        Ok(run) => (
            StatusCode::OK,
            Json(serde_json::json!({"id": run.id, "status": run.status, "output": run.output})),
        ),
        Err(e @ EngineError::RunNotFound { .. }) => error(StatusCode::NOT_FOUND, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let serve = args.first().is_some_and(|a| a == "--serve");
    let addr = if serve {
        args.get(1).context("--serve needs an address")?.clone()
    } else {
        "127.0.0.1:0".into()
    };
    let temporary = tempfile::tempdir()?;
    let dir = match args.get(if serve { 2 } else { 0 }) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => temporary.path().join("data"),
    };
    let engine = Engine::builder(&dir)
        .workflow::<PlaceOrder>()
        .step::<Reserve>()
        .step::<Charge>()
        .open()
        .await
        .context("opening the engine")?;
    let app = Router::new()
        .route("/orders", post(place))
        .route("/orders/{id}", get(status))
        .with_state(Arc::new(engine.clone()));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("serving on {base} (data in {})", dir.display());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    if serve {
        server.await??;
        return Ok(());
    }
    // Without --serve: show it, as a client would see it, then stop.
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let post = |key: &str, body: &str| {
            let answer = ureq::post(&format!("{base}/orders"))
                .set("Idempotency-Key", key)
                .set("Content-Type", "application/json")
                .send_string(body);
            match answer {
                Ok(r) => format!("{} {}", r.status(), r.into_string().unwrap_or_default()),
                Err(ureq::Error::Status(code, r)) => {
                    format!("{code} {}", r.into_string().unwrap_or_default())
                }
                Err(e) => format!("transport error: {e}"),
            }
        };
        let order = r#"{"item":"bolt","quantity":3}"#;
        println!("POST /orders (key order-1): {}", post("order-1", order));
        println!(
            "POST /orders (key order-1, a retry): {}",
            post("order-1", order)
        );
        let other = r#"{"item":"nut","quantity":1}"#;
        println!(
            "POST /orders (key order-1, another order): {}",
            post("order-1", other)
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        let status = ureq::get(&format!("{base}/orders/order-1"))
            .call()?
            .into_string()?;
        println!("GET /orders/order-1: {status}");
        Ok(())
    })
    .await??;
    server.abort();
    engine.shutdown().await;
    Ok(())
}
