//! The Docker executor on its own: environment, signals, exit codes, out-of-memory kills, pull
//! policies, mounts, networks, metrics, re-adoption and cleanup.

use super::run::{docker, TEST_IMAGE};
use super::{
    container_exists, eventually, executor, executor_for, spec, with_executor, with_first_executor,
    with_run,
};
use crate::probe::{
    exit_3_after, expect_exit_3, get_json, signal, soft_ignored_then_hard,
    soft_stop_then_signal_again, wait_for_log,
};
use hangar_drone::executor::docker::container_name;
use hangar_drone::executor::{Executor, ExecutorError, Reattached};
use hangar_test_support::IGNORING_SIGTERM;
use hangar_types::protocol::DroneToController;
use hangar_types::TerminationKind;
use std::net::{IpAddr, Ipv4Addr};

#[tokio::test]
async fn container_gets_its_environment_and_stops_on_sigterm() {
    with_executor(async |run, executor| {
        let spec = spec(run.executable(&[("GREETING", "hello"), ("PORT", "1")]));
        executor.prepare(&spec).await.unwrap();
        let started = executor.start(&spec).await.unwrap();
        assert_eq!(started.address.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let env = get_json(started.address, "/env").await;
        assert_eq!(env["GREETING"], "hello");
        // The contract's PORT wins over the user's.
        assert_eq!(env["PORT"], "8080");
        assert_eq!(env["SESSION_BACKEND_ID"], spec.id.as_str());
        assert_eq!(env["SESSION_BACKEND_KEY"], "room-1");
        assert_eq!(env["SESSION_BACKEND_FENCING_TOKEN"], "1234");
        let token = spec.static_token.as_ref().unwrap().as_str();
        assert_eq!(env["SESSION_BACKEND_STATIC_TOKEN"], token);
        assert!(env.get("HANGAR_DATA_DIR").is_none());
        let name = container_name(&spec.id);
        assert_eq!(started.backend.record()["container"], name.as_str());
        // The container carries the drone's labels and the hardened settings.
        let labels = docker(&["inspect", "--format", "{{json .Config.Labels}}", &name]).unwrap();
        let labels: serde_json::Value = serde_json::from_str(&labels).unwrap();
        assert_eq!(labels["dev.hangar.backend"], spec.id.as_str());
        assert!(labels["dev.hangar.drone"].as_str().unwrap().starts_with("dr-"));
        let security = docker(&["inspect", "--format", "{{json .HostConfig.SecurityOpt}} {{json .HostConfig.CapDrop}} {{.HostConfig.Privileged}}", &name]).unwrap();
        assert_eq!(security, r#"["no-new-privileges"] ["NET_RAW"] false"#);
        wait_for_log(&started, "listening on").await;

        soft_stop_then_signal_again(&started).await;
        assert!(!started.backend.oom_killed());
        // The logs were kept before the container was removed.
        wait_for_log(&started, "got SIGTERM").await;
        assert!(!container_exists(&name));
    })
    .await
}

#[tokio::test]
async fn soft_terminate_only_asks_and_hard_terminate_kills() {
    with_executor(async |run, executor| {
        let spec = spec(run.executable(IGNORING_SIGTERM));
        let started = executor.start(&spec).await.unwrap();
        assert_eq!(soft_ignored_then_hard(&started).await, Some(137));
    })
    .await
}

#[tokio::test]
async fn exit_code_of_a_container_that_exits_by_itself() {
    with_executor(async |run, executor| {
        let spec = spec(run.executable(&exit_3_after("300")));
        let started = executor.start(&spec).await.unwrap();
        expect_exit_3(&started).await;
    })
    .await
}

#[tokio::test]
async fn out_of_memory_is_reported() {
    with_executor(async |run, executor| {
        let exe = run.executable_with(
            &[],
            serde_json::json!({"resource_limits": {"memory_limit_bytes": 64 * 1024 * 1024}}),
        );
        let spec = spec(exe);
        let started = executor.start(&spec).await.unwrap();
        get_json(started.address, "/env").await;
        // Far above the limit (swap included, if the host has any): the kernel kills the backend.
        let url = format!("http://{}/alloc/512", started.address);
        let _ = reqwest::Client::new().post(url).send().await;
        assert_eq!(started.backend.exited().await, Some(137));
        assert!(started.backend.oom_killed());
    })
    .await
}

#[tokio::test]
async fn pull_policies() {
    with_executor(async |run, executor| {
        // The local image: found with IfNotPresent and Never, nothing pulled.
        for policy in ["IfNotPresent", "Never"] {
            let exe = run.executable_with(&[], serde_json::json!({"pull_policy": policy}));
            executor.prepare(&spec(exe)).await.unwrap();
        }
        // Never with a missing image: a clear error, no pull attempted.
        let missing = "hangar-test-missing-image:never";
        let exe = run.executable_with(
            &[],
            serde_json::json!({"image": missing, "pull_policy": "Never"}),
        );
        let err = executor.prepare(&spec(exe)).await.unwrap_err();
        assert!(matches!(err, ExecutorError::ImageNotPresent { .. }));
        assert_eq!(
            err.to_string(),
            format!("image {missing} is not present and pull_policy is Never")
        );
        // Always with an image no registry serves: the pull fails with Docker's reason.
        let unpullable = "127.0.0.1:1/hangar/missing:1";
        let exe = run.executable_with(
            &[],
            serde_json::json!({"image": unpullable, "pull_policy": "Always",
                "credentials": {"username": "u", "password": "p"}}),
        );
        let pulls_before = executor.image_pulls();
        let err = executor.prepare(&spec(exe)).await.unwrap_err();
        assert!(matches!(err, ExecutorError::Pull { .. }), "{err}");
        assert_eq!(executor.image_pulls(), pulls_before + 1);
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("cannot pull image {unpullable}: ")),
            "{message}"
        );
        assert!(message.len() > format!("cannot pull image {unpullable}: ").len());
        // Concurrent spawns of one missing image (a warm pool filling) share one real pull (it
        // fails here: no registry answers on 127.0.0.1:1); each gets its result.
        let before = executor.image_pulls();
        let shared = "127.0.0.1:1/hangar/missing:shared";
        let exe = run.executable_with(&[], serde_json::json!({"image": shared}));
        let specs: Vec<_> = (0..5).map(|_| spec(exe.clone())).collect();
        let results =
            futures_util::future::join_all(specs.iter().map(|s| executor.prepare(s))).await;
        for result in results {
            assert!(
                matches!(result, Err(ExecutorError::Pull { .. })),
                "{result:?}"
            );
        }
        assert_eq!(executor.image_pulls(), before + 1);
        // A later spawn (nothing in flight) pulls again.
        executor.prepare(&spec(exe)).await.unwrap_err();
        assert_eq!(executor.image_pulls(), before + 2);
        // The present image with IfNotPresent: inspected, never pulled.
        let local = run.executable_with(&[], serde_json::json!({"pull_policy": "IfNotPresent"}));
        let specs: Vec<_> = (0..5).map(|_| spec(local.clone())).collect();
        for result in
            futures_util::future::join_all(specs.iter().map(|s| executor.prepare(s))).await
        {
            result.unwrap();
        }
        assert_eq!(executor.image_pulls(), before + 2);
        // A start without a present image fails too, and leaves nothing behind.
        let exe = run.executable_with(&[], serde_json::json!({"image": missing}));
        let spec = spec(exe);
        assert!(executor.start(&spec).await.is_err());
        assert!(!container_exists(&container_name(&spec.id)));
    })
    .await
}

#[tokio::test]
async fn mounts_live_under_the_mount_base() {
    with_run(async |run| {
        let base = tempfile::tempdir().unwrap();
        let (executor, _metrics) = executor(Some(base.path().to_path_buf())).await;
        let exe = run.executable_with(&[], serde_json::json!({"mount": "data/custom-mount"}));
        let started = executor.start(&spec(exe)).await.unwrap();
        let env = get_json(started.address, "/env").await;
        assert_eq!(env["HANGAR_DATA_DIR"], "/plane-data");
        let url = format!("http://{}/write/hello.txt", started.address);
        let resp = reqwest::Client::new()
            .post(url)
            .body("hi from the container")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        let written = base.path().join("data/custom-mount/hello.txt");
        assert_eq!(
            std::fs::read_to_string(&written).unwrap(),
            "hi from the container"
        );
        // `mount: true` is a directory named after the key.
        let exe = run.executable_with(&[], serde_json::json!({"mount": true}));
        let by_key = executor.start(&spec(exe)).await.unwrap();
        assert!(base.path().join("room-1").is_dir());
        // Escapes are refused before anything is created.
        for escape in ["../outside", "/etc", "a/b/../../../x"] {
            let exe = run.executable_with(&[], serde_json::json!({"mount": escape}));
            let err = executor.start(&spec(exe)).await.err().unwrap();
            assert!(
                err.to_string().contains("not under the mount base"),
                "{escape}: {err}"
            );
        }
        for started in [started, by_key] {
            signal(&started, TerminationKind::Hard).await;
            started.backend.exited().await;
        }
        executor.shutdown().await;

        // A drone without a mount base refuses mounts.
        let (executor, _metrics) = super::executor(None).await;
        let exe = run.executable_with(&[], serde_json::json!({"mount": true}));
        let err = executor.start(&spec(exe)).await.err().unwrap();
        assert!(err.to_string().contains("no mount base"), "{err}");
        executor.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn named_network_gives_the_container_address() {
    with_executor(async |run, executor| {
        let network = run.network();
        let exe = run.executable_with(&[], serde_json::json!({"network_name": network}));
        let started = executor.start(&spec(exe)).await.unwrap();
        // Not published: the address is the container's own on that network.
        assert_eq!(started.address.port(), 8080);
        assert_ne!(started.address.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let name = started.backend.record()["container"]
            .as_str()
            .unwrap()
            .to_string();
        let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
        let ip = docker(&["inspect", "--format", &format, &name]).unwrap();
        assert_eq!(ip, started.address.ip().to_string());
        get_json(started.address, "/env").await;
        signal(&started, TerminationKind::Soft).await;
        assert_eq!(started.backend.exited().await, Some(0));
    })
    .await;
}

#[tokio::test]
async fn metrics_report_memory_in_use() {
    with_run(async |run| {
        let (executor, mut metrics) = executor(None).await;
        let spec = spec(run.executable(&[]));
        let started = executor.start(&spec).await.unwrap();
        get_json(started.address, "/env").await;
        // The first sample is taken at once.
        let sample = tokio::time::timeout(super::WAIT, metrics.recv())
            .await
            .expect("no metrics sample")
            .unwrap();
        let DroneToController::BackendMetrics {
            backend_id,
            mem_used,
            mem_limit,
            ..
        } = sample
        else {
            panic!("unexpected message {sample:?}")
        };
        assert_eq!(backend_id, spec.id);
        assert!(mem_used > 0);
        assert!(mem_limit >= mem_used);
        signal(&started, TerminationKind::Hard).await;
        started.backend.exited().await;
        executor.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn restarted_executor_readopts_running_and_reports_stopped_containers() {
    with_first_executor(async |run, drone, first| {
        let stopped = spec(run.executable(IGNORING_SIGTERM));
        let running = spec(run.executable(&[]));
        let a = first.start(&running).await.unwrap();
        let b = first.start(&stopped).await.unwrap();
        get_json(a.address, "/env").await;
        get_json(b.address, "/env").await;
        let record = a.backend.record();
        // The drone goes away: its containers keep running.
        first.shutdown().await;
        assert!(container_exists(&container_name(&running.id)));
        get_json(a.address, "/env").await;
        // One of them is killed while nobody watches.
        docker(&["kill", &container_name(&stopped.id)]).unwrap();

        let (second, _metrics) = executor_for(drone, None).await;
        let Reattached::Running(adopted) =
            second.reattach(&running.id, Some(&record)).await.unwrap()
        else {
            panic!("the running container was not re-adopted")
        };
        assert_eq!(adopted.address, a.address);
        assert_eq!(
            get_json(adopted.address, "/env").await["SESSION_BACKEND_ID"],
            running.id.as_str()
        );
        wait_for_log(&adopted, "listening on").await;
        let gone = second.reattach(&stopped.id, None).await.unwrap();
        assert!(
            matches!(
                gone,
                Reattached::Exited {
                    exit_code: Some(137),
                    oom_killed: false
                }
            ),
            "the stopped container was not reported with its exit code"
        );
        assert!(!container_exists(&container_name(&stopped.id)));
        let never = second
            .reattach(&hangar_types::BackendId::random(), None)
            .await
            .unwrap();
        assert!(matches!(never, Reattached::Gone));

        signal(&adopted, TerminationKind::Soft).await;
        assert_eq!(adopted.backend.exited().await, Some(0));
        assert!(run.containers().is_empty());
        second.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn orphans_and_old_stopped_containers_are_removed() {
    with_first_executor(async |run, drone, first| {
        let kept = spec(run.executable(&[]));
        let orphan = spec(run.executable(&[]));
        let kept_started = first.start(&kept).await.unwrap();
        first.start(&orphan).await.unwrap();
        first.shutdown().await;
        // Another drone's container, and a stopped one of this drone.
        let label = format!("--label={}", run.label());
        let stranger = format!("hangar-test-stranger-{}", run.id);
        docker(&[
            "create",
            "--name",
            &stranger,
            &label,
            "--label",
            "dev.hangar.drone=dr-someone-else",
            "--label",
            "dev.hangar.backend=x",
            TEST_IMAGE,
        ])
        .unwrap();
        let stale = format!("hangar-test-stale-{}", run.id);
        docker(&[
            "create",
            "--name",
            &stale,
            &label,
            "--label",
            &format!("dev.hangar.drone={drone}"),
            "--label",
            "dev.hangar.backend=y",
            TEST_IMAGE,
        ])
        .unwrap();

        let (second, _metrics) = executor_for(drone, None).await;
        let Reattached::Running(adopted) = second.reattach(&kept.id, None).await.unwrap() else {
            panic!("not re-adopted")
        };
        // Only the supervised backend survives; another drone's container is never touched.
        let removed = second
            .remove_orphans(std::slice::from_ref(&kept.id))
            .await
            .unwrap();
        assert_eq!(removed, 2);
        assert!(!container_exists(&container_name(&orphan.id)));
        assert!(!container_exists(&stale));
        assert!(container_exists(&stranger));
        assert!(container_exists(&container_name(&kept.id)));
        // The periodic pass removes this drone's stopped containers, not the ones it follows.
        let stale_again = format!("hangar-test-stale2-{}", run.id);
        docker(&[
            "create",
            "--name",
            &stale_again,
            &label,
            "--label",
            &format!("dev.hangar.drone={drone}"),
            "--label",
            "dev.hangar.backend=z",
            TEST_IMAGE,
        ])
        .unwrap();
        assert_eq!(second.remove_stopped_containers().await.unwrap(), 1);
        assert!(!container_exists(&stale_again));
        assert!(container_exists(&stranger));
        assert_eq!(
            get_json(adopted.address, "/env").await["SESSION_BACKEND_ID"],
            kept.id.as_str()
        );
        assert_eq!(kept_started.address, adopted.address);
        signal(&adopted, TerminationKind::Hard).await;
        adopted.backend.exited().await;
        eventually("the container to be removed", || {
            !container_exists(&container_name(&kept.id))
        })
        .await;
        second.shutdown().await;
    })
    .await;
}
