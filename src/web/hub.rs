//! What the live view shows, handed from the daemon's publisher to every open page: a feed of
//! JSON messages, the latest of each kind for a page that opens later, the answers to the
//! pages' own questions and, when the owner allows it, the current frame.

use image::RgbImage;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, oneshot};

/// Messages a page may fall behind by; a page further behind skips the oldest (it shows the
/// live scene, not a log).
const FEED: usize = 256;
/// Recent watch events a page gets when it opens.
const RECENT_EVENTS: usize = 20;
/// Pages' questions waiting for their answer, at most; more are answered `busy`.
pub const PENDING_ASKS: usize = 64;

/// One message of the feed: its kind (`hello`, `pose`, `stats`, `watch`, `event`) and JSON.
#[derive(Debug, Clone)]
pub struct FeedItem {
    pub kind: &'static str,
    pub data: Arc<str>,
}

/// The latest of each kind, for a page that opens now.
#[derive(Default)]
struct Latest {
    pose: Option<Arc<str>>,
    stats: Option<Arc<str>>,
    watches: BTreeMap<String, Arc<str>>,
    events: VecDeque<Arc<str>>,
}

/// The current frame, and its JPEG once a page asked for it.
#[derive(Default)]
struct CurrentFrame {
    seq: u64,
    rgb: Option<Arc<RgbImage>>,
    jpeg: Option<(u64, Arc<Vec<u8>>)>,
}

/// Where the answer to a page's question goes: its HTTP status and JSON.
type AnswerTx = oneshot::Sender<(u16, Arc<str>)>;

/// Shared by the publisher (which feeds it) and the web server (which reads it).
pub struct ViewHub {
    hello: Arc<str>,
    feed: broadcast::Sender<FeedItem>,
    latest: Mutex<Latest>,
    frame: Mutex<CurrentFrame>,
    show_frames: bool,
    pending: Mutex<HashMap<u64, AnswerTx>>,
}

impl ViewHub {
    /// `hello`: what a page needs before the first message (device, skeleton, watch rules).
    pub fn new(hello: serde_json::Value, show_frames: bool) -> Arc<Self> {
        let (feed, _) = broadcast::channel(FEED);
        Arc::new(Self {
            hello: hello.to_string().into(),
            feed,
            latest: Mutex::default(),
            frame: Mutex::default(),
            show_frames,
            pending: Mutex::default(),
        })
    }

    fn send(&self, kind: &'static str, data: Arc<str>) {
        // No page open: nothing to do.
        let _ = self.feed.send(FeedItem { kind, data });
    }

    fn latest(&self) -> std::sync::MutexGuard<'_, Latest> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pose(&self, json: String) {
        let data: Arc<str> = json.into();
        self.latest().pose = Some(data.clone());
        self.send("pose", data);
    }

    pub fn stats(&self, json: &[u8]) {
        let data: Arc<str> = String::from_utf8_lossy(json).into();
        self.latest().stats = Some(data.clone());
        self.send("stats", data);
    }

    /// A watch rule's state (`watch` names it).
    pub fn watch(&self, watch: &str, json: &[u8]) {
        let data: Arc<str> = String::from_utf8_lossy(json).into();
        self.latest()
            .watches
            .insert(watch.to_string(), data.clone());
        self.send("watch", data);
    }

    pub fn event(&self, json: &[u8]) {
        let data: Arc<str> = String::from_utf8_lossy(json).into();
        {
            let mut latest = self.latest();
            if latest.events.len() == RECENT_EVENTS {
                latest.events.pop_front();
            }
            latest.events.push_back(data.clone());
        }
        self.send("event", data);
    }

    /// Keep the frame just posed, when frames may be shown.
    pub fn frame(&self, seq: u64, rgb: &Arc<RgbImage>) {
        if self.show_frames {
            let mut f = self.frame.lock().unwrap_or_else(|e| e.into_inner());
            f.seq = seq;
            f.rgb = Some(rgb.clone());
        }
    }

    pub fn shows_frames(&self) -> bool {
        self.show_frames
    }

    /// The current frame as a JPEG at most `max_side` pixels a side, encoded once per frame;
    /// `None` before the first frame or when frames are not shown.
    pub fn frame_jpeg(&self, max_side: u32) -> Option<Arc<Vec<u8>>> {
        let (seq, rgb) = {
            let f = self.frame.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((s, jpeg)) = &f.jpeg {
                if *s == f.seq {
                    return Some(jpeg.clone());
                }
            }
            (f.seq, f.rgb.clone()?)
        };
        let small = image::imageops::thumbnail(
            rgb.as_ref(),
            max_side.min(rgb.width()),
            (max_side * rgb.height() / rgb.width().max(1)).clamp(1, max_side),
        );
        let mut out = Vec::new();
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 75);
        if let Err(e) = small.write_with_encoder(encoder) {
            log::warn!("cannot encode the frame for the live view: {e}");
            return None;
        }
        let jpeg = Arc::new(out);
        let mut f = self.frame.lock().unwrap_or_else(|e| e.into_inner());
        f.jpeg = Some((seq, jpeg.clone()));
        Some(jpeg)
    }

    /// A page opens: what it gets first (hello, then the latest of each kind), and the feed
    /// from now on.
    pub fn subscribe(&self) -> (Vec<FeedItem>, broadcast::Receiver<FeedItem>) {
        let latest = self.latest();
        // Subscribed under the lock: nothing sent between the snapshot and the feed is lost.
        let rx = self.feed.subscribe();
        let mut first = vec![FeedItem {
            kind: "hello",
            data: self.hello.clone(),
        }];
        let item = |kind, data: &Arc<str>| FeedItem {
            kind,
            data: data.clone(),
        };
        first.extend(latest.stats.iter().map(|d| item("stats", d)));
        first.extend(latest.watches.values().map(|d| item("watch", d)));
        first.extend(latest.events.iter().map(|d| item("event", d)));
        first.extend(latest.pose.iter().map(|d| item("pose", d)));
        (first, rx)
    }

    /// A page's question is on its way: its answer comes through the returned receiver.
    /// `None` when [`PENDING_ASKS`] are waiting already.
    pub fn expect_answer(&self, key: u64) -> Option<oneshot::Receiver<(u16, Arc<str>)>> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= PENDING_ASKS {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        pending.insert(key, tx);
        Some(rx)
    }

    /// The page gave up waiting (it closed the request).
    pub fn forget(&self, key: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    /// The answer to a page's question with its HTTP status (dropped if that page is gone).
    pub fn answer(&self, key: u64, status: u16, json: &[u8]) {
        let tx = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        if let Some(tx) = tx {
            let _ = tx.send((status, String::from_utf8_lossy(json).into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_that_opens_late_gets_the_latest_of_each_kind_then_the_feed() {
        let hub = ViewHub::new(serde_json::json!({"device": "d"}), false);
        hub.pose("{\"seq\":1}".into());
        hub.pose("{\"seq\":2}".into());
        hub.watch("a", b"{\"value\":true}");
        hub.watch("a", b"{\"value\":false}");
        for i in 0..RECENT_EVENTS + 3 {
            hub.event(format!("{{\"n\":{i}}}").as_bytes());
        }
        let (first, mut rx) = hub.subscribe();
        let kinds: Vec<_> = first.iter().map(|i| i.kind).collect();
        assert_eq!(kinds[0], "hello");
        assert_eq!(
            kinds.iter().filter(|k| **k == "event").count(),
            RECENT_EVENTS
        );
        assert_eq!(first.last().map(|i| &*i.data), Some("{\"seq\":2}"));
        let w: Vec<_> = first.iter().filter(|i| i.kind == "watch").collect();
        assert_eq!(w.len(), 1);
        assert_eq!(&*w[0].data, "{\"value\":false}");
        // The oldest events went, the newest stayed.
        let events: Vec<_> = first.iter().filter(|i| i.kind == "event").collect();
        assert_eq!(&*events[0].data, "{\"n\":3}");
        hub.stats(b"{\"pose_fps\":1}");
        let next = rx.try_recv().unwrap();
        assert_eq!((next.kind, &*next.data), ("stats", "{\"pose_fps\":1}"));
    }

    #[test]
    fn answers_reach_the_page_that_asked_and_pending_asks_are_bounded() {
        let hub = ViewHub::new(serde_json::json!({}), false);
        let mut rx = hub.expect_answer(7).unwrap();
        hub.answer(8, 200, b"{}");
        assert!(rx.try_recv().is_err());
        hub.answer(7, 503, b"{\"id\":\"x\"}");
        let (status, json) = rx.try_recv().unwrap();
        assert_eq!((status, &*json), (503, "{\"id\":\"x\"}"));
        for k in 0..PENDING_ASKS as u64 {
            assert!(hub.expect_answer(100 + k).is_some());
        }
        assert!(hub.expect_answer(1000).is_none());
        hub.forget(100);
        assert!(hub.expect_answer(1000).is_some());
    }

    #[test]
    fn frames_are_kept_only_when_shown() {
        let rgb = Arc::new(RgbImage::from_pixel(64, 32, image::Rgb([200, 10, 10])));
        let hidden = ViewHub::new(serde_json::json!({}), false);
        hidden.frame(1, &rgb);
        assert!(hidden.frame_jpeg(320).is_none());
        let shown = ViewHub::new(serde_json::json!({}), true);
        assert!(shown.frame_jpeg(320).is_none());
        shown.frame(1, &rgb);
        let jpeg = shown.frame_jpeg(16).unwrap();
        let decoded = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (16, 8));
        // Encoded once per frame.
        assert!(Arc::ptr_eq(&jpeg, &shown.frame_jpeg(16).unwrap()));
    }
}
