//! What a store tells the other stores sharing its database: `NOTIFY` payloads on [`CHANNEL`].
//!
//! A payload is JSON `{"origin": "<store>", "events": [<notice>, …]}`. PostgreSQL refuses payloads of
//! 8000 bytes or more, so notices stay small: an action is sent as a pointer (`drone`, `action_id`) that
//! the listener reads back from `backend_action`; a state is sent inline unless it is large (a long
//! termination message), then as a pointer to its `backend_state` row; revoked tokens are split over
//! several notices; an ACME HTTP challenge is sent inline (bounded by the controller); a certificate as a
//! pointer (`cluster`) to its `cluster_certificate` row, so no PEM travels in a notification. Notices of
//! one transaction are packed into as few payloads as fit.
//!
//! Notifications are sent inside the transaction that made the change, so PostgreSQL delivers them only
//! if it commits, in commit order.

use crate::dialect::Announced;
use crate::events::StoreEvent;
use crate::model::NodeId;
use crate::{StoreError, StoreResult};
use hangar_types::protocol::TokenHolder;
use hangar_types::token::ConnectionToken;
use hangar_types::{ActionId, BackendId, BackendState, ClusterName, Millis};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

/// The `LISTEN`/`NOTIFY` channel of store events.
pub(super) const CHANNEL: &str = "hangar_events";

/// Upper bound of one payload in bytes, below PostgreSQL's 8000-byte limit.
const PAYLOAD_LIMIT: usize = 7_500;
/// Upper bound of one notice in bytes; larger states go by pointer, tokens are split. Several notices of
/// one transaction (a state and an action) then fit one payload.
const NOTICE_LIMIT: usize = 2_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Payload {
    pub origin: String,
    pub events: Vec<Notice>,
}

/// One event in a payload: the event itself when it is small, else a pointer to the row that holds it.
/// Both are objects tagged by `kind` (`state`, `tokens_revoked`, `http_challenge` inline; `state_row`,
/// `action`, `certificate` by pointer).
// Short-lived (built to be encoded, or decoded to be relayed), like the events they carry.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Notice {
    /// A backend state too large to send inline: row `history_id` of `backend_state`.
    StateRow { history_id: i64 },
    /// An action was queued: row `action_id` of `backend_action`.
    Action { drone: NodeId, action_id: ActionId },
    /// A certificate was stored: row `cluster` of `cluster_certificate` (PEMs never go inline).
    Certificate { cluster: ClusterName },
    /// A backend state, revoked tokens, or an ACME HTTP-01 challenge answer (which the controller
    /// bounds to a few hundred bytes), inline.
    #[serde(untagged)]
    Inline(StoreEvent),
}

impl Notice {
    /// A state notice: inline when small, else a pointer to its history row.
    pub(super) fn state(
        history_id: i64,
        backend: &BackendId,
        state: &BackendState,
        time: Millis,
    ) -> Notice {
        let inline = Notice::Inline(StoreEvent::BackendState {
            backend: backend.clone(),
            state: state.clone(),
            time,
        });
        if encoded_len(&inline) <= NOTICE_LIMIT {
            inline
        } else {
            Notice::StateRow { history_id }
        }
    }

    /// Revoked tokens and their holder, split into notices of at most [`NOTICE_LIMIT`] bytes, each
    /// with the holder (one notice without tokens when there are none). A token too large for a
    /// notice on its own (never one Hangar generated) is left out, with a warning: other controllers'
    /// proxies then learn of its revocation only when their cached route expires. A holder too large
    /// (a user name of kilobytes) is left out the same way.
    pub(super) fn tokens_revoked(
        tokens: &[ConnectionToken],
        holder: Option<&TokenHolder>,
    ) -> Vec<Notice> {
        // JSON overhead of an empty notice and of one more token (quotes and comma), generously.
        const BASE: usize = 64;
        const PER_TOKEN: usize = 4;
        let holder = holder.filter(|h| {
            let fits = BASE + holder_len(h) <= NOTICE_LIMIT / 2;
            if !fits {
                tracing::warn!(
                    length = holder_len(h),
                    "Revoked holder too long to notify other controllers"
                );
            }
            fits
        });
        let base = BASE + holder.map_or(0, holder_len);
        let notice = |tokens| {
            Notice::Inline(StoreEvent::TokensRevoked {
                tokens,
                holder: holder.cloned(),
            })
        };
        let mut notices = Vec::new();
        let mut chunk: Vec<ConnectionToken> = Vec::new();
        let mut size = base;
        for token in tokens {
            let len = token.as_str().len() + PER_TOKEN;
            if base + len > NOTICE_LIMIT {
                tracing::warn!(
                    length = token.as_str().len(),
                    "Revoked token too long to notify other controllers"
                );
                continue;
            }
            if size + len > NOTICE_LIMIT {
                notices.push(notice(std::mem::take(&mut chunk)));
                size = base;
            }
            size += len;
            chunk.push(token.clone());
        }
        if !chunk.is_empty() || (notices.is_empty() && holder.is_some()) {
            notices.push(notice(chunk));
        }
        notices
    }
}

/// The bytes `holder` adds to a notice (its JSON, with its key), generously.
fn holder_len(holder: &TokenHolder) -> usize {
    serde_json::to_string(holder).map_or(usize::MAX / 2, |json| json.len() + 16)
}

/// The notices that tell other stores about `a` (a state only with its history row, which a large
/// state is sent as).
fn notices(a: &Announced) -> Vec<Notice> {
    vec![match &a.event {
        StoreEvent::BackendState {
            backend,
            state,
            time,
        } => match a.history_id {
            Some(history_id) => Notice::state(history_id, backend, state, *time),
            None => return Vec::new(),
        },
        StoreEvent::Action { drone, action } => Notice::Action {
            drone: *drone,
            action_id: action.action_id.clone(),
        },
        StoreEvent::TokensRevoked { tokens, holder } => {
            return Notice::tokens_revoked(tokens, holder.as_ref())
        }
        event @ StoreEvent::HttpChallenge { .. } => Notice::Inline(event.clone()),
        StoreEvent::Certificate(c) => Notice::Certificate {
            cluster: c.cluster.clone(),
        },
    }]
}

fn encoded_len<T: Serialize>(v: &T) -> usize {
    // Serializing these types cannot fail (no maps with non-string keys); a failure counts as too big.
    serde_json::to_string(v).map_or(usize::MAX, |s| s.len())
}

/// Packs notices, in order, into as few payloads as fit [`PAYLOAD_LIMIT`].
pub(super) fn payloads(origin: &str, notices: Vec<Notice>) -> StoreResult<Vec<String>> {
    let encode = |events: Vec<Notice>| {
        let payload = Payload {
            origin: origin.to_string(),
            events,
        };
        serde_json::to_string(&payload)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode notification: {e}")))
    };
    let empty = encode(Vec::new())?.len();
    let mut out = Vec::new();
    let mut batch: Vec<Notice> = Vec::new();
    // Encoded size of the notices in `batch`, each with its separating comma.
    let mut size = 0;
    for notice in notices {
        let len = encoded_len(&notice).saturating_add(1);
        if !batch.is_empty() && empty + size + len > PAYLOAD_LIMIT {
            out.push(encode(std::mem::take(&mut batch))?);
            size = 0;
        }
        size += len;
        batch.push(notice);
    }
    if !batch.is_empty() {
        out.push(encode(batch)?);
    }
    Ok(out)
}

/// Sends the notices of `events` on [`CHANNEL`] as part of the transaction on `conn`.
pub(super) async fn send(
    conn: &mut PgConnection,
    origin: &str,
    events: &[Announced],
) -> StoreResult<()> {
    let notices = events.iter().flat_map(notices).collect();
    for payload in payloads(origin, notices)? {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::{BackendStatus, TerminationKind, TerminationReason};

    fn terminated(message: String) -> BackendState {
        BackendState::Terminated {
            last_status: BackendStatus::Ready,
            termination: Some(TerminationKind::Hard),
            reason: Some(TerminationReason::External),
            exit_code: Some(1),
            message: Some(message),
            oom_killed: false,
        }
    }

    #[test]
    fn small_states_go_inline_large_ones_by_row() {
        let id = BackendId::random();
        let small = terminated("bye".into());
        assert_eq!(
            Notice::state(7, &id, &small, Millis(5)),
            Notice::Inline(StoreEvent::BackendState {
                backend: id.clone(),
                state: small,
                time: Millis(5)
            })
        );
        let large = terminated("x".repeat(10_000));
        assert_eq!(
            Notice::state(7, &id, &large, Millis(5)),
            Notice::StateRow { history_id: 7 }
        );
    }

    #[test]
    fn many_tokens_are_split_and_every_payload_fits() {
        let tokens: Vec<ConnectionToken> = (0..500).map(|_| ConnectionToken::random()).collect();
        let holder = TokenHolder {
            backend: BackendId::random(),
            user: "u".repeat(300),
        };
        let notices = Notice::tokens_revoked(&tokens, Some(&holder));
        assert!(notices.len() > 1);
        let mut seen = Vec::new();
        for n in &notices {
            assert!(encoded_len(n) <= NOTICE_LIMIT, "{}", encoded_len(n));
            let Notice::Inline(StoreEvent::TokensRevoked {
                tokens,
                holder: with,
            }) = n
            else {
                panic!("unexpected {n:?}")
            };
            assert_eq!(
                with.as_ref(),
                Some(&holder),
                "every notice names the holder"
            );
            seen.extend(tokens.iter().cloned());
        }
        assert_eq!(seen, tokens, "all tokens, in order");

        let payloads = payloads("origin-x", notices.clone()).unwrap();
        assert!(payloads.len() > 1 && payloads.len() < notices.len());
        let mut decoded = Vec::new();
        for p in &payloads {
            assert!(p.len() <= PAYLOAD_LIMIT, "{}", p.len());
            let payload: Payload = serde_json::from_str(p).unwrap();
            assert_eq!(payload.origin, "origin-x");
            decoded.extend(payload.events);
        }
        assert_eq!(decoded, notices, "packing keeps every notice, in order");
    }

    #[test]
    fn oversized_tokens_are_left_out() {
        let huge = ConnectionToken::from_path_segment(&"t".repeat(NOTICE_LIMIT));
        let normal = ConnectionToken::random();
        assert_eq!(
            Notice::tokens_revoked(&[huge, normal.clone()], None),
            vec![Notice::Inline(StoreEvent::TokensRevoked {
                tokens: vec![normal],
                holder: None,
            })]
        );
        assert!(Notice::tokens_revoked(&[], None).is_empty());
        // A holder is announced even without tokens; one too large is left out.
        let holder = TokenHolder {
            backend: BackendId::random(),
            user: "alice".into(),
        };
        assert_eq!(
            Notice::tokens_revoked(&[], Some(&holder)),
            vec![Notice::Inline(StoreEvent::TokensRevoked {
                tokens: vec![],
                holder: Some(holder.clone()),
            })]
        );
        let huge_user = TokenHolder {
            user: "u".repeat(NOTICE_LIMIT),
            ..holder
        };
        assert!(Notice::tokens_revoked(&[], Some(&huge_user)).is_empty());
    }

    /// Inline events keep the format of the notices they replaced (`kind` plus the fields), so a
    /// store of the previous version sharing the database decodes them, and this one decodes its own.
    #[test]
    fn inline_events_keep_their_wire_format() {
        let id = BackendId::random();
        let state = Notice::state(1, &id, &BackendState::Scheduled, Millis(5));
        let expected = serde_json::json!({
            "kind": "state",
            "backend": id.as_str(),
            "state": serde_json::to_value(BackendState::Scheduled).unwrap(),
            "time": serde_json::to_value(Millis(5)).unwrap(),
        });
        assert_eq!(serde_json::to_value(&state).unwrap(), expected);
        let challenge = r#"{"kind":"http_challenge","cluster":"c.example","token":"t","key_authorization":null}"#;
        assert_eq!(
            serde_json::from_str::<Notice>(challenge).unwrap(),
            Notice::Inline(StoreEvent::HttpChallenge {
                cluster: "c.example".parse().unwrap(),
                token: "t".into(),
                key_authorization: None,
            })
        );
        let action = Notice::Action {
            drone: 3,
            action_id: ActionId::random(),
        };
        let text = serde_json::to_string(&action).unwrap();
        assert!(text.starts_with(r#"{"kind":"action","#), "{text}");
        assert_eq!(serde_json::from_str::<Notice>(&text).unwrap(), action);
    }

    #[test]
    fn one_transaction_usually_fits_one_payload() {
        let id = BackendId::random();
        let notices = vec![
            Notice::state(1, &id, &BackendState::Scheduled, Millis(1)),
            Notice::Action {
                drone: 3,
                action_id: ActionId::random(),
            },
        ];
        let payloads = payloads("o", notices.clone()).unwrap();
        assert_eq!(payloads.len(), 1);
        let payload: Payload = serde_json::from_str(&payloads[0]).unwrap();
        assert_eq!(payload.events, notices);
    }
}
