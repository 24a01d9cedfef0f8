//! LISTEN for commits and captured changes: one connection per database
//! (outside the pool), on the bridge's runtime, reconnecting after a
//! second when it is lost. A lost connection may lose notifications:
//! after reconnecting both signals fire once, and streams also look for
//! new ops on every keepalive.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

use crate::bridge::Bridge;
use crate::layout::quote_ident;
use crate::tls::{Connector, Opened};
use crate::Shared;

/// How long to wait before connecting again.
const RECONNECT_DELAY_MS: u64 = 1_000;

pub(crate) fn start(
    bridge: &Bridge,
    config: tokio_postgres::Config,
    connector: Connector,
    shared: &Arc<Shared>,
) -> ferry_source::Result<()> {
    let commit_channel = shared.names.commit_channel.clone();
    let capture_channel = shared.names.capture_channel.clone();
    let commits = shared.commits.clone();
    let captures = shared.captures.clone();
    bridge.spawn(async move {
        loop {
            // Ends with the bridge's runtime, when the database is dropped.
            listen_once(
                &config,
                &connector,
                &commit_channel,
                &capture_channel,
                &commits,
                &captures,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(RECONNECT_DELAY_MS)).await;
        }
    })
}

fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|n| *n = n.wrapping_add(1));
}

async fn listen_once(
    config: &tokio_postgres::Config,
    connector: &Connector,
    commit_channel: &str,
    capture_channel: &str,
    commits: &watch::Sender<u64>,
    captures: &watch::Sender<u64>,
) {
    let Ok(opened) = connector.open(config).await else {
        return;
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (client, driver) = match opened {
        Opened::Tls(client, connection) => (client, forward_notifications(*connection, tx)),
        Opened::Plain(client, connection) => (client, forward_notifications(*connection, tx)),
    };
    let listen = format!(
        "LISTEN {}; LISTEN {};",
        quote_ident(commit_channel),
        quote_ident(capture_channel)
    );
    if client.batch_execute(&listen).await.is_err() {
        driver.abort();
        return;
    }
    // Whatever happened while not listening.
    bump(commits);
    bump(captures);
    while let Some(channel) = rx.recv().await {
        if channel == commit_channel {
            bump(commits);
        } else if channel == capture_channel {
            bump(captures);
        }
    }
    driver.abort();
}

/// A task driving the connection and sending the channel of every
/// notification to `tx`, until the connection or `tx`'s receiver ends.
fn forward_notifications<T>(
    mut connection: tokio_postgres::Connection<tokio_postgres::Socket, T>,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
) -> tokio::task::JoinHandle<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.channel().to_owned()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    })
}
