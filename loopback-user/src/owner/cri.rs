//! The container runtime's CRI API (`runtime.v1.RuntimeService`, as kubelet speaks it) over its
//! unix socket: which pod sandboxes and containers there are, with their Kubernetes metadata.
//! The client is tonic's, generated at build time from the vendored `proto/cri-v1.proto`.
use std::{path::PathBuf, time::Duration};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

pub use api::runtime_service_client::RuntimeServiceClient;

/// What one call may take: a runtime that answers slower is treated as one that does not.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A client on the unix socket `path` (connected lazily: the first call connects, and a call
/// to a missing or refusing socket fails within [`CALL_TIMEOUT`]).
pub fn client(path: PathBuf) -> RuntimeServiceClient<Channel> {
    // The URI is not used for a unix socket; tonic needs one.
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }));
    RuntimeServiceClient::new(channel)
}

/// One pod sandbox as the runtime lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// Its labels (kubelet's `io.kubernetes.*` and the pod's own, e.g. `pod-template-hash`).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// One container as the runtime lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub sandbox_id: String,
}

/// Everything one runtime says: its name (`containerd`, `cri-o`), its sandboxes and containers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub runtime: String,
    pub sandboxes: Vec<Sandbox>,
    pub containers: Vec<Container>,
}

/// One call, bounded by [`CALL_TIMEOUT`]; an error names the call.
async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Err(e) => Err(format!("{what}: {e}")),
        Ok(Err(e)) => Err(format!("{what}: {}", e.message())),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// The runtime's name, sandboxes and containers, each call bounded by [`CALL_TIMEOUT`].
pub async fn list(c: &mut RuntimeServiceClient<Channel>) -> Result<Listing, String> {
    let v = bounded("Version", c.version(api::VersionRequest { version: "v1".into() })).await?;
    let sandboxes = bounded(
        "ListPodSandbox",
        c.list_pod_sandbox(api::ListPodSandboxRequest { filter: None }),
    )
    .await?
    .items
    .into_iter()
    .map(|s| {
        let m = s.metadata.unwrap_or_default();
        Sandbox {
            id: s.id,
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            labels: s.labels.into_iter().collect(),
        }
    })
    .collect();
    let containers = bounded(
        "ListContainers",
        c.list_containers(api::ListContainersRequest { filter: None }),
    )
    .await?
    .containers
    .into_iter()
    .map(|c| Container {
        id: c.id,
        name: c.metadata.unwrap_or_default().name,
        sandbox_id: c.pod_sandbox_id,
    })
    .collect();
    Ok(Listing {
        runtime: v.runtime_name,
        sandboxes,
        containers,
    })
}
