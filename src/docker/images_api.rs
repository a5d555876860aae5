//! The image routes of the Docker API: `docker import`, `docker load`, `docker images`,
//! `image inspect`, `tag`, `rmi`, and `docker pull` (refused: there is no registry).
//!
//! Uploads stream: the request body goes to a blocking task through a bounded channel
//! ([`BodyReader`]), so a multi-gigabyte `docker load` never sits in memory. `import` reads the
//! tar straight from it; `load` spools the archive to `DIR/images/tmp/` first (its manifest is
//! at the end and members are read out of order) and removes the spool afterwards. Layers are
//! verified and stored content-addressed before anything is written to the store, and the
//! image rows are written in one transaction ([`super::images::insert`]), so a failed upload
//! leaves no image behind (a verified blob may remain in `DIR/images/sha256/`, unreferenced;
//! a later `rmi` of any image collects it).

use std::io::{Read, Seek};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::accounts::Account;
use super::api::{self, ok, read, write, Op, Reply, Req};
use super::archive::{self, ImportOpts};
use super::error;
use super::images::{self, ImageError};
use super::Docker;
use crate::control::db::Db;
use crate::control::error::OpError;

impl From<ImageError> for OpError {
    fn from(e: ImageError) -> OpError {
        match e {
            ImageError::Db(e) => e,
            e if e.status() >= 500 => OpError::Corrupt(e.to_string()),
            e => error::err(e.status(), e.to_string()),
        }
    }
}

/// The image name of `/images/{name…}/suffix` (names may hold slashes).
fn name_between(path: &[String], suffix: Option<&str>) -> Option<String> {
    let end = match suffix {
        Some(s) if path.last().map(String::as_str) == Some(s) => path.len() - 1,
        Some(_) => return None,
        None => path.len(),
    };
    (end > 1).then(|| path[1..end].join("/"))
}

/// The operation of an `/images/...` request that has no upload body, if this module serves
/// it.
pub fn route(req: &Req) -> Option<Op> {
    let m = req.method.as_str();
    let m = if m == "HEAD" { "GET" } else { m };
    let q = req.query.clone();
    let p = &req.path;
    if p.first().map(String::as_str) != Some("images") {
        return None;
    }
    match (m, p.len()) {
        ("GET", 2) if p[1] == "json" => Some(read(move |d, c| {
            let all = q.bool("all")?;
            let f = images::parse_filters(q.get("filters").unwrap_or(""))?;
            ok(images::list(d, &c.account.uuid, all, &f)?)
        })),
        ("GET", _) => {
            let name = name_between(p, Some("json"))?;
            Some(read(move |d, c| {
                match images::inspect(d, &c.account.uuid, &name) {
                    // moby wraps the lookup's error on this route.
                    Err(ImageError::NotFound(n)) => Err(error::not_found(format!(
                        "no such image: {name}: No such image: {n}"
                    ))),
                    r => ok(r?),
                }
            }))
        }
        ("POST", _) if p.last().map(String::as_str) == Some("tag") => {
            let name = name_between(p, Some("tag"))?;
            Some(write(move |d, c| {
                let repo = q.get("repo").unwrap_or("");
                images::tag(d, &c.account.uuid, &name, repo, q.get("tag").unwrap_or(""))?;
                Ok(Reply::Empty(StatusCode::CREATED))
            }))
        }
        ("DELETE", _) => {
            let name = name_between(p, None)?;
            let force = q.bool("force");
            Some(Op::Async(Box::new(move |docker, account| {
                Box::pin(async move { remove(docker, account, name, force?).await })
            })))
        }
        _ => None,
    }
}

/// `DELETE /images/{name}`: untag/delete in one transaction, then collect the layers no image
/// references any more.
async fn remove(
    docker: Arc<Docker>,
    account: Account,
    name: String,
    force: bool,
) -> Result<Reply, OpError> {
    let d = docker.clone();
    let removed = blocking(move || {
        crate::control::http::write_txn(&d.app, |tx| {
            Ok(images::remove(
                &mut Db::from(tx.raw()),
                &account.uuid,
                &name,
                force,
            )?)
        })
    })
    .await?;
    if !removed.unreferenced.is_empty() {
        let d = docker.clone();
        let gone = removed.unreferenced.clone();
        let r = blocking(move || {
            crate::control::http::write_txn(&d.app, |tx| {
                Ok(images::gc_layers(
                    &mut Db::from(tx.raw()),
                    &d.layers,
                    &gone,
                )?)
            })
        })
        .await;
        if let Err(e) = r {
            // The image is gone either way; an unreferenced blob is only disk space.
            tracing::warn!(error = %e, "collecting unreferenced layers");
        }
    }
    api::ok(Value::Array(removed.items))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| error::err(500, "internal error"))?
}

/// Whether a request is an upload this module reads itself (`POST /images/create`, `POST
/// /images/load`): the API layer then hands it the body unread.
pub fn is_upload(req: &Req) -> bool {
    req.method == "POST"
        && req.path.len() == 2
        && req.path[0] == "images"
        && (req.path[1] == "create" || req.path[1] == "load")
}

/// The operation of an upload route, with its body.
pub fn route_upload(req: &Req, body: Body) -> Op {
    let q = req.query.clone();
    if req.path[1] == "load" {
        // `quiet` only hides moby's progress bars; there are none here, and the `Loaded image`
        // lines are printed either way. It is still checked as a boolean.
        if let Err(e) = q.bool("quiet") {
            return Op::Now(Err(e));
        }
        return Op::Async(Box::new(move |docker, account| {
            Box::pin(async move { load(docker, account, body).await })
        }));
    }
    if let Some(from) = q.get("fromImage") {
        let tag = q.get("tag").unwrap_or("");
        let name = if tag.is_empty() || from.contains('@') {
            from.to_string()
        } else {
            format!("{from}:{tag}")
        };
        // The name as the user typed it (the CLI sends the normalized one).
        let name = name
            .strip_prefix("docker.io/library/")
            .or_else(|| name.strip_prefix("docker.io/"))
            .unwrap_or(&name)
            .to_string();
        return Op::Now(Err(error::not_found(format!(
            "pull access denied for {name}: fabric has no registry; bring images in as files with `docker load -i IMAGE.tar` (a docker save archive) or `docker import ROOTFS.tar {name}`"
        ))));
    }
    match q.get("fromSrc") {
        Some("-") => {}
        Some(src) => {
            return Op::Now(Err(error::bad_request(format!(
                "fromSrc {src:?}: fabric imports only from the request body (fromSrc=-: `docker import FILE` or `docker import - < FILE`), never from a URL"
            ))))
        }
        None => {
            return Op::Now(Err(error::bad_request(
                "POST /images/create needs fromSrc=- (docker import) or fromImage (docker pull, which fabric refuses: there is no registry)",
            )))
        }
    }
    let opts = import_opts(&q);
    Op::Async(Box::new(move |docker, account| {
        Box::pin(async move { import(docker, account, body, opts?).await })
    }))
}

fn import_opts(q: &api::Query) -> Result<ImportOpts, OpError> {
    let repo_tag =
        images::import_reference(q.get("repo").unwrap_or(""), q.get("tag").unwrap_or(""))?;
    Ok(ImportOpts {
        changes: q
            .0
            .iter()
            .filter(|(k, _)| k == "changes")
            .map(|(_, v)| v.clone())
            .collect(),
        message: q.get("message").filter(|m| !m.is_empty()).map(String::from),
        repo_tag,
    })
}

/// A request body read from a blocking task: chunks arrive through a bounded channel.
pub struct BodyReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    chunk: Bytes,
}

impl BodyReader {
    /// Starts forwarding `body`'s chunks (at most 8 in flight).
    pub fn spawn(body: Body) -> BodyReader {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut body = body;
            loop {
                match body.frame().await {
                    None => return,
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data() {
                            if tx.send(Ok(data)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        let _ = tx.send(Err(e.to_string())).await;
                        return;
                    }
                }
            }
        });
        BodyReader {
            rx,
            chunk: Bytes::new(),
        }
    }
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => {
                    return Err(std::io::Error::other(format!(
                        "reading the request body: {e}"
                    )))
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

/// A JSON-lines progress answer (`application/json`), as moby streams them.
fn messages(lines: &[Value]) -> Reply {
    let mut body = Vec::new();
    for l in lines {
        body.extend_from_slice(&serde_json::to_vec(l).unwrap_or_default());
        body.extend_from_slice(b"\r\n");
    }
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Reply::Response(r)
}

fn store_images(
    docker: &Docker,
    account: &Account,
    imgs: &[images::NewImage],
) -> Result<(), OpError> {
    crate::control::http::write_txn(&docker.app, |tx| {
        let mut db = Db::from(tx.raw());
        for img in imgs {
            images::insert(&mut db, &account.uuid, img, Some(&docker.layers))?;
        }
        Ok(())
    })
}

/// `docker import`: the body is a root filesystem tar (plain or gzip).
async fn import(
    docker: Arc<Docker>,
    account: Account,
    body: Body,
    opts: ImportOpts,
) -> Result<Reply, OpError> {
    let reader = BodyReader::spawn(body);
    let d = docker.clone();
    let id = blocking(move || {
        let img = archive::import(&d.layers, reader, &opts)?;
        store_images(&d, &account, std::slice::from_ref(&img))?;
        Ok(img.id)
    })
    .await?;
    Ok(messages(&[json!({ "status": id })]))
}

/// A spooled upload in `DIR/images/tmp/`, removed when dropped.
struct Spool(std::path::PathBuf);

impl Spool {
    fn new(d: &Docker) -> Result<Spool, OpError> {
        let name = crate::control::params::random_uuid()
            .map_err(|e| OpError::Corrupt(format!("random: {e}")))?;
        Ok(Spool(
            d.layers.root().join("tmp").join(format!("load-{name}")),
        ))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `docker load`: the body is a `docker save` archive, spooled to a file first.
async fn load(docker: Arc<Docker>, account: Account, body: Body) -> Result<Reply, OpError> {
    let mut reader = BodyReader::spawn(body);
    let d = docker.clone();
    let imgs = blocking(move || {
        let spool = Spool::new(&d)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&spool.0)
            .map_err(|e| OpError::Corrupt(format!("{}: {e}", spool.0.display())))?;
        std::io::copy(&mut reader, &mut file)
            .map_err(|e| error::bad_request(format!("reading the archive: {e}")))?;
        file.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| OpError::Corrupt(format!("{}: {e}", spool.0.display())))?;
        let imgs = archive::load(&d.layers, file)?;
        store_images(&d, &account, &imgs)?;
        Ok(imgs)
    })
    .await?;
    let mut lines = Vec::new();
    for img in &imgs {
        if img.repo_tags.is_empty() {
            lines.push(json!({"stream": format!("Loaded image ID: {}\n", img.id)}));
        }
        for t in &img.repo_tags {
            lines.push(json!({"stream": format!("Loaded image: {t}\n")}));
        }
    }
    Ok(messages(&lines))
}
