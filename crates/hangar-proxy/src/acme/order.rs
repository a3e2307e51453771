//! One ACME order, run by the holder of the cluster's certificate lease (plane-api.md §7.9.4):
//! authorizations one at a time (the cluster has one TXT value, and `<cluster>` and `*.<cluster>`
//! share the name `_acme-challenge.<cluster>`): publish the answer, wait `challenge_wait`, tell the
//! ACME server, wait until the authorization is valid, withdraw the answer; then finalize with a
//! fresh key and download the chain. The lease is renewed before each step so it cannot run out
//! during a long order.

use super::{AcmeChallenge, AcmeError};
use crate::cert_link::{CertAnswer, CertLink};
use crate::tls::{CertPem, TlsState};
use hangar_types::protocol::ProxyToController;
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, Order, OrderStatus,
    RetryPolicy,
};
use std::time::Duration;

/// How long to wait for the controller to answer a lease or TXT request.
pub(super) const CONTROLLER_ANSWER_WAIT: Duration = Duration::from_secs(10);
/// First pause between polls of an authorization; doubles up to [`MAX_POLL_DELAY`].
const FIRST_POLL_DELAY: Duration = Duration::from_millis(250);
const MAX_POLL_DELAY: Duration = Duration::from_secs(5);

/// What an order needs from the proxy.
pub(super) struct OrderContext<'a> {
    pub(super) account: &'a Account,
    pub(super) names: &'a [String],
    pub(super) challenge: AcmeChallenge,
    pub(super) challenge_wait: Duration,
    pub(super) order_timeout: Duration,
    pub(super) link: &'a CertLink,
    pub(super) tls: &'a TlsState,
}

/// A published challenge answer, withdrawn once its authorization is decided.
enum Published {
    Txt,
    Http { token: String },
}

/// Asks for (or renews) the cluster's certificate lease. `Ok(false)`: another proxy holds it.
pub(super) async fn request_lease(link: &CertLink) -> Result<bool, AcmeError> {
    match link
        .request(ProxyToController::CertLeaseRequest, CONTROLLER_ANSWER_WAIT)
        .await?
    {
        CertAnswer::Lease { accepted } => Ok(accepted),
        CertAnswer::TxtRecord { .. } => Err(AcmeError::Link(
            crate::cert_link::LinkError::UnexpectedAnswer,
        )),
    }
}

async fn renew_lease(link: &CertLink) -> Result<(), AcmeError> {
    match request_lease(link).await? {
        true => Ok(()),
        false => Err(AcmeError::LeaseLost),
    }
}

/// Runs an order for `ctx.names` to completion. The caller holds the lease.
pub(super) async fn run_order(ctx: &OrderContext<'_>) -> Result<CertPem, AcmeError> {
    tokio::time::timeout(ctx.order_timeout, order_steps(ctx))
        .await
        .map_err(|_| AcmeError::OrderTimeout(ctx.order_timeout))?
}

async fn order_steps(ctx: &OrderContext<'_>) -> Result<CertPem, AcmeError> {
    let identifiers: Vec<Identifier> = ctx
        .names
        .iter()
        .map(|name| Identifier::Dns(name.clone()))
        .collect();
    let mut order = ctx
        .account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(AcmeError::Order)?;
    tracing::info!(names = ?ctx.names, order = order.url(), "Created an ACME order");
    loop {
        renew_lease(ctx.link).await?;
        let Some((url, name, published)) = publish_next_answer(&mut order, ctx).await? else {
            break;
        };
        let decided = wait_for_authorization(&mut order, &url, &name).await;
        withdraw(ctx, published).await;
        decided?;
        tracing::info!(%name, "ACME authorization is valid");
    }
    renew_lease(ctx.link).await?;
    let retries = RetryPolicy::new().timeout(ctx.order_timeout);
    let status = order.poll_ready(&retries).await.map_err(AcmeError::Order)?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::OrderNotReady(format!("{status:?}")));
    }
    let key_pem = order.finalize().await.map_err(AcmeError::Order)?;
    let cert_pem = order
        .poll_certificate(&retries)
        .await
        .map_err(AcmeError::Order)?;
    Ok(CertPem { cert_pem, key_pem })
}

/// Publishes the answer for the first pending authorization and tells the ACME server it is ready.
/// Returns the authorization's URL and name, or `None` when every authorization is valid.
async fn publish_next_answer(
    order: &mut Order,
    ctx: &OrderContext<'_>,
) -> Result<Option<(String, String, Published)>, AcmeError> {
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(AcmeError::Order)?;
        let name = authorization.identifier().to_string();
        match authorization.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            status => {
                let detail = problem_detail(&authorization.challenges);
                return Err(AcmeError::AuthorizationFailed {
                    name,
                    status: format!("{status:?}"),
                    detail,
                });
            }
        }
        let url = authorization.url().to_string();
        let kind = match ctx.challenge {
            AcmeChallenge::Dns01 => ChallengeType::Dns01,
            AcmeChallenge::Http01 => ChallengeType::Http01,
        };
        let mut challenge =
            authorization
                .challenge(kind)
                .ok_or_else(|| AcmeError::NoChallenge {
                    name: name.clone(),
                    challenge: ctx.challenge,
                })?;
        let published = match ctx.challenge {
            AcmeChallenge::Dns01 => {
                let value = challenge.key_authorization().dns_value();
                let request = ProxyToController::SetTxtRecord {
                    txt_value: Some(value),
                };
                match ctx.link.request(request, CONTROLLER_ANSWER_WAIT).await? {
                    CertAnswer::TxtRecord { accepted: true } => {}
                    _ => return Err(AcmeError::LeaseLost),
                }
                Published::Txt
            }
            AcmeChallenge::Http01 => {
                let token = challenge.token.clone();
                let answer = challenge.key_authorization().as_str().to_string();
                // Served here at once; the controller pushes it to the other proxies (and here).
                ctx.tls.set_challenge(token.clone(), Some(answer.clone()));
                ctx.link.send(ProxyToController::SetHttpChallenge {
                    token: token.clone(),
                    key_authorization: Some(answer),
                });
                Published::Http { token }
            }
        };
        tracing::debug!(%name, challenge = ?ctx.challenge, "Published an ACME challenge answer");
        tokio::time::sleep(ctx.challenge_wait).await;
        challenge.set_ready().await.map_err(AcmeError::Order)?;
        return Ok(Some((url, name, published)));
    }
    Ok(None)
}

/// Polls until the authorization at `url` is valid (or fails).
async fn wait_for_authorization(order: &mut Order, url: &str, name: &str) -> Result<(), AcmeError> {
    let mut delay = FIRST_POLL_DELAY;
    loop {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_POLL_DELAY);
        order.refresh().await.map_err(AcmeError::Order)?;
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let authorization = authorization.map_err(AcmeError::Order)?;
            if authorization.url() != url {
                continue;
            }
            match authorization.status {
                AuthorizationStatus::Valid => return Ok(()),
                AuthorizationStatus::Pending => break,
                status => {
                    return Err(AcmeError::AuthorizationFailed {
                        name: name.to_string(),
                        status: format!("{status:?}"),
                        detail: problem_detail(&authorization.challenges),
                    })
                }
            }
        }
    }
}

/// Withdraws a published answer. Failures only leave a stale answer behind, which the next order
/// overwrites, so they are logged and ignored.
async fn withdraw(ctx: &OrderContext<'_>, published: Published) {
    match published {
        Published::Txt => {
            let request = ProxyToController::SetTxtRecord { txt_value: None };
            if let Err(error) = ctx.link.request(request, CONTROLLER_ANSWER_WAIT).await {
                tracing::debug!(%error, "Could not clear the ACME TXT record");
            }
        }
        Published::Http { token } => {
            ctx.tls.set_challenge(token.clone(), None);
            ctx.link.send(ProxyToController::SetHttpChallenge {
                token,
                key_authorization: None,
            });
        }
    }
}

/// The ACME server's explanation of a failed challenge, if it gave one.
fn problem_detail(challenges: &[instant_acme::Challenge]) -> Option<String> {
    challenges
        .iter()
        .find_map(|c| c.error.as_ref())
        .map(|problem| problem.to_string())
}
