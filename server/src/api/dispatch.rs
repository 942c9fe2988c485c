//! The service a client URL serves: each gRPC call goes straight to its service, past axum's
//! router; everything else (the HTTP endpoints, the JSON gateway) to the member's full router.
//!
//! tonic's `Routes` is an axum router: a call through it boxes the request body into axum's and
//! back into tonic's, boxes the response body twice the same way, and each middleware layer adds a
//! boxed future. Under etcd's benchmark tool that stack cost about as much CPU per put as the
//! storage core's whole apply (bench/RESULTS.md, 2026-11-28, "the client port's dispatch"), so
//! the hot path matches the service name itself and applies etcd's interceptors
//! ([`refusal`]) inline.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use axum::http::{HeaderMap, Request, Response};
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower_service::Service;

use keel_proto::etcdserverpb::auth_server::AuthServer;
use keel_proto::etcdserverpb::cluster_server::ClusterServer;
use keel_proto::etcdserverpb::kv_server::KvServer;
use keel_proto::etcdserverpb::lease_server::LeaseServer;
use keel_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use keel_proto::etcdserverpb::watch_server::WatchServer;
use keel_proto::health::health_server::HealthServer;
use keel_proto::v3electionpb::election_server::ElectionServer;
use keel_proto::v3lockpb::lock_server::LockServer;

use super::auth::AuthService;
use super::cluster::ClusterService;
use super::election::ElectionService;
use super::health::HealthService;
use super::kv::KvService;
use super::lease::LeaseService;
use super::lock::LockService;
use super::maintenance::MaintenanceService;
use super::watch::WatchService;
use crate::raft::Core;

/// The gRPC services of a member, as configured (message limits) by `server.rs`.
#[derive(Clone)]
pub struct Services {
    pub kv: KvServer<KvService>,
    pub lease: LeaseServer<LeaseService>,
    pub watch: WatchServer<WatchService>,
    pub cluster: ClusterServer<ClusterService>,
    pub maintenance: MaintenanceServer<MaintenanceService>,
    pub auth: AuthServer<AuthService>,
    pub lock: LockServer<LockService>,
    pub election: ElectionServer<ElectionService>,
    pub health: HealthServer<HealthService>,
}

impl Services {
    /// The services as tonic routes (an axum router): the JSON gateway calls them through it.
    pub fn routes(&self) -> tonic::service::Routes {
        tonic::service::Routes::new(self.kv.clone())
            .add_service(self.lease.clone())
            .add_service(self.watch.clone())
            .add_service(self.cluster.clone())
            .add_service(self.maintenance.clone())
            .add_service(self.auth.clone())
            .add_service(self.lock.clone())
            .add_service(self.election.clone())
            .add_service(self.health.clone())
    }
}

/// The client URLs' service: [`Services`] by name, the rest to `fallback`. The server clones it
/// for every call, so it is one `Arc`; a call clones only the service it reaches.
#[derive(Clone)]
pub struct ClientService(Arc<Shared>);

struct Shared {
    core: Core,
    services: Services,
    fallback: tonic::service::Routes,
}

impl ClientService {
    /// `fallback` serves every path that does not name one of `services`.
    pub fn new(core: Core, services: Services, fallback: tonic::service::Routes) -> Self {
        ClientService(Arc::new(Shared {
            core,
            services,
            fallback: fallback.prepare(),
        }))
    }
}

/// The future of one call.
pub enum ClientFuture {
    /// Refused before reaching a service.
    Refused(Option<Response<Body>>),
    /// A gRPC service's answer (tonic's generated services box their futures), counted in
    /// `grpc_server_handled_total` once its status is known.
    Grpc(
        Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>,
        Option<Counted>,
    ),
    /// The fallback router's.
    Fallback(<tonic::service::Routes as Service<Request<Body>>>::Future),
}

impl Future for ClientFuture {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            ClientFuture::Refused(response) => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            ClientFuture::Grpc(future, counted) => future.as_mut().poll(cx).map_ok(|response| {
                let response = grpc_go_answer(response);
                match counted.take() {
                    Some(c) => c.watch(response),
                    None => response,
                }
            }),
            ClientFuture::Fallback(future) => Pin::new(future).poll(cx),
        }
    }
}

impl Service<Request<Body>> for ClientService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ClientFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Every service (tonic's generated ones, the router) is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ClientFuture {
        let path = request.uri().path();
        // grpc-go's split: the method after the last '/'.
        let Some((name, method)) = path.strip_prefix('/').unwrap_or(path).rsplit_once('/') else {
            if is_grpc(request.headers()) {
                // grpc-go's answer, the path quoted as Go's %q does (`{:?}` for ASCII).
                let status = Status::resource_exhausted(format!("malformed method name: {path:?}"));
                return ClientFuture::Refused(Some(status.into_http()));
            }
            return ClientFuture::Fallback(self.0.fallback.clone().call(request));
        };
        let shared = &*self.0;
        macro_rules! serve {
            ($service:expr) => {{
                if !declared(name, method) {
                    let status = Status::unimplemented(format!(
                        "unknown method {method} for service {name}"
                    ));
                    return ClientFuture::Refused(Some(status.into_http()));
                }
                if let Some(status) = refusal(&shared.core, path, request.headers()) {
                    return ClientFuture::Refused(Some(status.into_http()));
                }
                // Counted after etcd's own interceptor, as go-grpc-prometheus's comes after it.
                let metrics = shared.core.metrics();
                let counted = metrics.grpc.start(path).map(|method| Counted {
                    metrics: metrics.clone(),
                    method,
                    done: false,
                });
                ClientFuture::Grpc($service.clone().call(request), counted)
            }};
        }
        let s = &shared.services;
        match name {
            n if n == <KvServer<KvService> as NamedService>::NAME => serve!(s.kv),
            n if n == <LeaseServer<LeaseService> as NamedService>::NAME => serve!(s.lease),
            n if n == <WatchServer<WatchService> as NamedService>::NAME => serve!(s.watch),
            n if n == <ClusterServer<ClusterService> as NamedService>::NAME => serve!(s.cluster),
            n if n == <MaintenanceServer<MaintenanceService> as NamedService>::NAME => {
                serve!(s.maintenance)
            }
            n if n == <AuthServer<AuthService> as NamedService>::NAME => serve!(s.auth),
            n if n == <LockServer<LockService> as NamedService>::NAME => serve!(s.lock),
            n if n == <ElectionServer<ElectionService> as NamedService>::NAME => {
                serve!(s.election)
            }
            n if n == <HealthServer<HealthService> as NamedService>::NAME => serve!(s.health),
            // A gRPC call of a service no member serves: grpc-go's answer. Anything else (the
            // HTTP endpoints, the JSON gateway) goes to the router.
            _ if is_grpc(request.headers()) => {
                let status = Status::unimplemented(format!("unknown service {name}"));
                ClientFuture::Refused(Some(status.into_http()))
            }
            _ => ClientFuture::Fallback(shared.fallback.clone().call(request)),
        }
    }
}

/// A service's answer, with a request over the message limit refused as grpc-go refuses it
/// (`ResourceExhausted`, not tonic's `OutOfRange`: [`super::convert::grpc_go_status`]). tonic
/// answers a request it cannot decode in the response's headers, trailers-only; a stream that
/// fails later (Watch) ends with that status itself.
fn grpc_go_answer(mut response: Response<Body>) -> Response<Body> {
    let out_of_range = |v: &axum::http::HeaderValue| v.as_bytes() == b"11";
    if response
        .headers()
        .get("grpc-status")
        .is_some_and(out_of_range)
        && let Some(status) = Status::from_header_map(response.headers())
    {
        let status = super::convert::grpc_go_status(status);
        if status.code() == tonic::Code::ResourceExhausted {
            // Only fails for a message no header can carry; this one is ASCII.
            let _ = status.add_header(response.headers_mut());
        }
    }
    response
}

/// A call whose end is still to be counted in `grpc_server_handled_total`: with the status of
/// its answer, or `Canceled` if it is dropped first (its client went away).
pub struct Counted {
    metrics: Arc<crate::metrics::Metrics>,
    method: usize,
    done: bool,
}

impl Counted {
    fn finish(&mut self, code: i32) {
        if !self.done {
            self.done = true;
            self.metrics.grpc.handled(self.method, code);
        }
    }

    /// Counts `response`'s status now if its headers hold it (trailers-only), else when its
    /// body's trailers pass.
    fn watch(mut self, response: Response<Body>) -> Response<Body> {
        if let Some(code) = grpc_status(response.headers()) {
            self.finish(code);
            return response;
        }
        response.map(|inner| {
            Body::new(CountedBody {
                inner,
                counted: self,
            })
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled as i32);
    }
}

/// The `grpc-status` of a header map, if it has one.
fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    std::str::from_utf8(headers.get("grpc-status")?.as_bytes())
        .ok()?
        .parse()
        .ok()
}

/// A response body whose trailers are counted as the call's status.
struct CountedBody {
    inner: Body,
    counted: Counted,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.counted
                        .finish(grpc_status(trailers).unwrap_or(tonic::Code::Unknown as i32));
                }
            }
            Poll::Ready(Some(Err(s))) => this.counted.finish(s.code() as i32),
            // Ended without a status: grpc-go's client reads that as Unknown.
            Poll::Ready(None) => this.counted.finish(tonic::Code::Unknown as i32),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Methods the vendored (etcd 3.5) protos declare that etcd 3.4 does not serve: a call gets 3.4's
/// "unknown method" before its request is even decoded.
const NOT_IN_3_4: &[(&str, &str)] = &[("etcdserverpb.Maintenance", "Downgrade")];

/// The methods of every service the protos declare, by service, from their descriptors. A short
/// list: scanning it is cheaper than hashing the names.
static METHODS: LazyLock<Vec<(String, Vec<String>)>> = LazyLock::new(|| {
    let pool = prost_reflect::DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptors built with the protos decode");
    pool.services()
        .map(|s| {
            let methods = s
                .methods()
                .filter(|m| !NOT_IN_3_4.contains(&(s.full_name(), m.name())))
                .map(|m| m.name().to_owned())
                .collect();
            (s.full_name().to_owned(), methods)
        })
        .collect()
});

/// Whether `service` declares `method`.
fn declared(service: &str, method: &str) -> bool {
    METHODS
        .iter()
        .find(|(s, _)| s == service)
        .is_some_and(|(_, methods)| methods.iter().any(|m| m == method))
}

/// Whether a request is a gRPC call (grpc-go's test: the content type).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC methods a learner serves (etcd's `isRPCSupportedForLearner`: Status, and Range
/// when serializable, which the KV service checks).
const LEARNER_METHODS: &[&str] = &["/etcdserverpb.KV/Range", "/etcdserverpb.Maintenance/Status"];

/// etcd's interceptors, in its order: a learner refuses what it does not serve (`etcdserver:
/// rpc not supported for learner`); then a call that asks for a leader while this member knows
/// none is refused at once with `etcdserver: no leader` (`Unavailable`), so the client tries
/// another member instead of waiting on one cut off from the cluster.
pub fn refusal(core: &Core, path: &str, headers: &HeaderMap) -> Option<tonic::Status> {
    // etcd's interceptors run for every gRPC call, gRPC's health service's too.
    let grpc = path.starts_with("/etcdserverpb.")
        || path.starts_with("/v3")
        || path.starts_with("/grpc.health.v1.");
    if grpc && core.is_learner() && !LEARNER_METHODS.contains(&path) {
        return Some(super::convert::status(
            &keel_engine::Error::NotSupportedForLearner,
        ));
    }
    if super::requires_leader(headers) && core.leader() == 0 {
        return Some(super::convert::status(&keel_engine::Error::NoLeader));
    }
    None
}
