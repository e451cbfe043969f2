//! The live view (docs/web.md): one page, embedded in the binary, that shows the 3D pose, the
//! pose stream's charts, the watch rules, the device's health and a chat with the model, served
//! by the daemon on its own tokio runtime.
//!
//! * `GET /` — the page (HTML, CSS and script in one response: a device is offline).
//! * `GET /events` — the feed, as server-sent events (`hello`, `pose`, `stats`, `watch`,
//!   `event`); see [`ViewHub`].
//! * `POST /api/ask` — a question as JSON (`text`, optional `image: "live"`, `answer`,
//!   `conversation`: the MQTT ask without `id`). It goes through the same intake, queue,
//!   limits and error codes as an MQTT ask; the reply is the MQTT answer's JSON.
//! * `GET /frame.jpg` — the current frame, only with `web.show_frames = true`.
//!
//! With `web.token` set, every one of them needs it (`?token=` or `Authorization: Bearer`);
//! a missing or wrong token gets 401.

mod hub;

pub use hub::{FeedItem, ViewHub};

use crate::mqtt::{Ack, IncomingAsk, ReplyTo};
use crate::protocol::ErrorCode;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest a page's question waits for its answer before the page is told so.
const ANSWER_WAIT: Duration = Duration::from_secs(300);
/// The frame on the page, at most this many pixels a side.
const FRAME_SIDE: u32 = 320;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("web.listen = {address}: cannot listen there ({cause}); choose another port, or set web.listen = \"\" to turn the page off")]
    Bind {
        address: SocketAddr,
        cause: std::io::Error,
    },
}

/// What the page's requests need.
#[derive(Clone)]
struct Shared {
    hub: Arc<ViewHub>,
    token: Arc<str>,
    asks: mpsc::Sender<IncomingAsk>,
    next_key: Arc<AtomicU64>,
    /// Makes the page's request ids unlike any an MQTT client sent before (the intake answers
    /// each id once).
    id_prefix: Arc<str>,
    shutdown: CancellationToken,
}

/// Where the page is served and who may see it.
pub struct WebOptions {
    pub address: SocketAddr,
    pub token: String,
    /// The largest question body taken, in bytes.
    pub max_body: usize,
}

/// Listen on `options.address` (an error now if that is not possible) and serve until
/// `shutdown`; open feeds end then too.
pub fn serve(
    options: WebOptions,
    hub: Arc<ViewHub>,
    asks: mpsc::Sender<IncomingAsk>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), WebError> {
    let address = options.address;
    let bind = |cause| WebError::Bind { address, cause };
    let listener = std::net::TcpListener::bind(address).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let local = listener.local_addr().map_err(bind)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(bind)?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let shared = Shared {
        hub,
        token: options.token.into(),
        asks,
        next_key: Arc::new(AtomicU64::new(1)),
        id_prefix: format!("web-{started:x}").into(),
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/events", get(events))
        .route("/frame.jpg", get(frame))
        .route("/api/ask", post(ask))
        .layer(DefaultBodyLimit::max(options.max_body))
        .with_state(shared);
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(e) = server.await {
            log::error!("the live view's server stopped: {e}");
        }
    });
    Ok((local, task))
}

/// Equal in time whatever the first differing byte: the token is a secret.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The token the request carries, from `Authorization: Bearer` or `?token=`.
fn presented_token<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer.or_else(|| {
        uri.query()?
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
    })
}

/// `None` when the request may go on; the 401 otherwise.
fn check(shared: &Shared, headers: &HeaderMap, uri: &Uri) -> Option<Response> {
    if shared.token.is_empty() {
        return None;
    }
    let ok = presented_token(headers, uri)
        .is_some_and(|t| same_secret(t.as_bytes(), shared.token.as_bytes()));
    (!ok).then(|| {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "401: this page needs the token from the device's config (web.token): open /?token=<token>\n",
        )
            .into_response()
    })
}

/// The page: its HTML with the style sheet and script put in, built once.
fn page_html() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| {
        include_str!("page/index.html")
            .replace("/*STYLE*/", include_str!("page/view.css"))
            .replace("/*SCRIPT*/", include_str!("page/view.js"))
    })
}

async fn page(State(shared): State<Shared>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(refused) = check(&shared, &headers, &uri) {
        return refused;
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page_html(),
    )
        .into_response()
}

async fn events(State(shared): State<Shared>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(refused) = check(&shared, &headers, &uri) {
        return refused;
    }
    let (first, feed) = shared.hub.subscribe();
    let state = (first.into_iter(), feed, shared.shutdown.clone());
    let stream = futures_util::stream::unfold(state, |(mut first, mut feed, stop)| async move {
        let event = |item: FeedItem| {
            Ok::<_, Infallible>(Event::default().event(item.kind).data(&*item.data))
        };
        if let Some(item) = first.next() {
            return Some((event(item), (first, feed, stop)));
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return None,
                got = feed.recv() => match got {
                    Ok(item) => return Some((event(item), (first, feed, stop))),
                    // The page fell behind: it skips to the newest.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn frame(State(shared): State<Shared>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(refused) = check(&shared, &headers, &uri) {
        return refused;
    }
    if !shared.hub.shows_frames() {
        return (
            StatusCode::NOT_FOUND,
            "frames are not shown: the device's owner can turn them on with web.show_frames = true\n",
        )
            .into_response();
    }
    let hub = shared.hub.clone();
    match tokio::task::spawn_blocking(move || hub.frame_jpeg(FRAME_SIDE)).await {
        Ok(Some(jpeg)) => (
            [
                (header::CONTENT_TYPE, "image/jpeg"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            jpeg.as_ref().clone(),
        )
            .into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "no frame yet\n").into_response(),
    }
}

/// The HTTP status of a reply to a page's question: the reply's JSON says the rest.
pub fn http_status(error: Option<ErrorCode>) -> u16 {
    match error {
        None => 200,
        Some(ErrorCode::Busy | ErrorCode::ShuttingDown | ErrorCode::NoFrame) => 503,
        Some(ErrorCode::ContextFull | ErrorCode::EncoderError | ErrorCode::ModelError) => 500,
        Some(ErrorCode::ImageTooLarge) => 413,
        Some(_) => 400,
    }
}

fn error_reply(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    let body = crate::protocol::ErrorReply::new(None, code, message);
    (status, axum::Json(body)).into_response()
}

/// Forgets a page's question when its request ends, answered or not.
struct Waiting<'a> {
    hub: &'a ViewHub,
    key: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.hub.forget(self.key);
    }
}

async fn ask(State(shared): State<Shared>, headers: HeaderMap, uri: Uri, body: Bytes) -> Response {
    if let Some(refused) = check(&shared, &headers, &uri) {
        return refused;
    }
    let mut request = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => {
            return error_reply(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadJson,
                "the body must be a JSON object, e.g. {\"text\": \"What is the person doing?\", \"image\": \"live\"}",
            )
        }
    };
    let key = shared.next_key.fetch_add(1, Ordering::Relaxed);
    request["id"] = format!("{}-{key}", shared.id_prefix).into();
    let Some(answer) = shared.hub.expect_answer(key) else {
        return error_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Busy,
            "too many questions from pages are waiting; try again later",
        );
    };
    let _waiting = Waiting {
        hub: &shared.hub,
        key,
    };
    let incoming = IncomingAsk {
        payload: request.to_string().into_bytes(),
        reply_to: ReplyTo {
            web: Some(key),
            ..ReplyTo::default()
        },
        ack: Ack::none(),
    };
    // The same hand-over as MQTT asks: when it is full the daemon is busy.
    match shared.asks.try_send(incoming) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            return error_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Busy,
                "the daemon is busy; try again later",
            )
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return error_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ShuttingDown,
                "the daemon is stopping",
            )
        }
    }
    match tokio::time::timeout(ANSWER_WAIT, answer).await {
        Ok(Ok((status, json))) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            [(header::CONTENT_TYPE, "application/json")],
            json.to_string(),
        )
            .into_response(),
        Ok(Err(_)) => error_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "the daemon stopped before answering",
        ),
        Err(_) => error_reply(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Busy,
            "no answer within 300 s; the model may be overloaded",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_header_or_the_query_and_compare_whole() {
        let mut headers = HeaderMap::new();
        let uri: Uri = "/events?a=1&token=abc".parse().unwrap();
        assert_eq!(presented_token(&headers, &uri), Some("abc"));
        headers.insert(header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(presented_token(&headers, &uri), Some("xyz"));
        let bare: Uri = "/".parse().unwrap();
        assert_eq!(presented_token(&HeaderMap::new(), &bare), None);
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }

    #[test]
    fn the_page_holds_its_style_and_script() {
        let html = page_html();
        assert!(!html.contains("/*STYLE*/") && !html.contains("/*SCRIPT*/"));
        assert!(html.contains("EventSource") && html.contains("<canvas"));
        // Offline: nothing is fetched from elsewhere.
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "the page links out"
        );
    }

    #[test]
    fn error_replies_map_to_http_statuses() {
        assert_eq!(http_status(None), 200);
        assert_eq!(http_status(Some(ErrorCode::Busy)), 503);
        assert_eq!(http_status(Some(ErrorCode::TextTooLong)), 400);
        assert_eq!(http_status(Some(ErrorCode::ImageTooLarge)), 413);
        assert_eq!(http_status(Some(ErrorCode::ModelError)), 500);
    }
}
