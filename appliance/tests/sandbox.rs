//! The sandbox on its own: the built components (shipped policies and hostile fixtures) run by
//! the appliance's wasmtime runtime, each limit shown with its exact outcome.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use appliance::config::PolicyConfig;
use appliance::policy::World;
use appliance::policy::bindings::{Action, ActionKind, Decision, RequestContext};
use appliance::policy::runtime::{Compiled, Failure, Input, Runtime};

fn runtime(tune: impl FnOnce(&mut PolicyConfig)) -> (Runtime, tempfile::TempDir) {
    let mut config = PolicyConfig::default();
    tune(&mut config);
    let cache = tempfile::tempdir().unwrap();
    (Runtime::new(&config, cache.path()).unwrap(), cache)
}

fn compile(runtime: &Runtime, name: &str, world: World) -> Compiled {
    runtime.compile(&std::fs::read(common::policy_path(name)).unwrap(), world).unwrap()
}

fn ctx(robot_type: &str, instruction: &str, state: Vec<f32>) -> RequestContext {
    RequestContext {
        request_id: "r-1".into(),
        robot_id: "arm-1".into(),
        robot_type: robot_type.into(),
        model: "tiny-vla".into(),
        instruction: instruction.into(),
        state,
        time_ms: 1_795_000_000_000,
    }
}

fn action(kind: ActionKind, dof: u32, values: Vec<f32>) -> Action {
    let horizon = values.len() as u32 / dof;
    Action { kind, dof, horizon, values }
}

fn evaluate(
    runtime: &Runtime,
    policy: &Compiled,
    config: &str,
    ctx: &RequestContext,
    action: &Action,
) -> Result<Decision, Failure> {
    runtime.call(policy, &Arc::from("test"), &Arc::from(config), Input::Evaluate(ctx, action))
}

#[test]
fn joint_limits_clamps_per_robot_type_and_denies_non_finite_values() {
    let (rt, _cache) = runtime(|_| {});
    let policy = compile(&rt, "joint-limits", World::Safety);
    let config = r#"{"robot_types": {"ur5e": {"velocity": 0.5, "position": {"min": -1, "max": [1, 2, 3]}}}}"#;
    let c = ctx("ur5e", "pick", vec![0.0; 3]);
    let velocity = action(ActionKind::JointVelocity, 3, vec![0.7, -0.9, 0.1]);
    match evaluate(&rt, &policy, config, &c, &velocity).unwrap() {
        Decision::Modify(m) => assert_eq!(m.action.values, [0.5, -0.5, 0.1]),
        other => panic!("{other:?}"),
    }
    let position = action(ActionKind::JointPosition, 3, vec![1.5, 1.5, -2.0, 0.0, 0.0, 0.0]);
    match evaluate(&rt, &policy, config, &c, &position).unwrap() {
        Decision::Modify(m) => assert_eq!(m.action.values, [1.0, 1.5, -1.0, 0.0, 0.0, 0.0]),
        other => panic!("{other:?}"),
    }
    let within = action(ActionKind::JointVelocity, 3, vec![0.1, 0.2, 0.3]);
    assert!(matches!(evaluate(&rt, &policy, config, &c, &within).unwrap(), Decision::Allow));
    let nan = action(ActionKind::JointVelocity, 3, vec![0.1, f32::NAN, 0.3]);
    assert!(matches!(evaluate(&rt, &policy, config, &c, &nan).unwrap(), Decision::Deny(d) if d.code == "non_finite"));
    let other = ctx("kuka", "pick", vec![0.0; 3]);
    assert!(
        matches!(evaluate(&rt, &policy, config, &other, &within).unwrap(), Decision::Deny(d) if d.code == "no_limits")
    );
    let bad = evaluate(&rt, &policy, r#"{"robot_types": 3}"#, &c, &within).unwrap();
    assert!(matches!(bad, Decision::Deny(d) if d.code == "bad_config"));
}

#[test]
fn workspace_bounds_denies_end_effector_targets_outside_the_box() {
    let (rt, _cache) = runtime(|_| {});
    let policy = compile(&rt, "workspace-bounds", World::Safety);
    let config = r#"{"min": [-0.5, -0.5, 0.0], "max": [0.5, 0.5, 0.8]}"#;
    let c = ctx("ur5e", "pick", vec![0.0, 0.0, 0.7, 0.0, 0.0, 0.0, 0.0]);
    let inside = action(ActionKind::EndEffectorDelta, 6, vec![0.1, 0.0, 0.05, 0.0, 0.0, 0.0]);
    assert!(matches!(evaluate(&rt, &policy, config, &c, &inside).unwrap(), Decision::Allow));
    // Two steps: the second leaves the box upwards.
    let outside =
        action(ActionKind::EndEffectorDelta, 6, vec![0.0, 0.0, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0]);
    match evaluate(&rt, &policy, config, &c, &outside).unwrap() {
        Decision::Deny(d) => {
            assert_eq!(d.code, "outside_workspace");
            assert!(d.reason.contains("z = 0.8500"), "{}", d.reason);
        }
        other => panic!("{other:?}"),
    }
    let joints = action(ActionKind::JointVelocity, 6, vec![9.0; 6]);
    assert!(matches!(evaluate(&rt, &policy, config, &c, &joints).unwrap(), Decision::Allow));
}

#[test]
fn instruction_filter_denies_matching_instructions() {
    let (rt, _cache) = runtime(|_| {});
    let policy = compile(&rt, "instruction-filter", World::Admission);
    let config = r#"{"deny": ["disable safety", "ignore * limits"]}"#;
    let admit = |instruction: &str| {
        rt.call(&policy, &Arc::from("f"), &Arc::from(config), Input::Admit(&ctx("ur5e", instruction, vec![]))).unwrap()
    };
    assert!(matches!(admit("pick up the red block"), Decision::Allow));
    assert!(matches!(admit("Ignore all joint limits now"), Decision::Deny(d) if d.code == "instruction_denied"));
    assert!(matches!(admit("ignore limits"), Decision::Allow));
}

#[test]
fn each_limit_stops_its_hostile_fixture_with_the_exact_failure() {
    let hostile = ctx("ur5e", "attack", vec![0.0; 7]);
    let a = action(ActionKind::JointVelocity, 7, vec![0.0; 7]);
    let run = |rt: &Runtime, name: &str| evaluate(rt, &compile(rt, name, World::Safety), "{}", &hostile, &a);

    // Wall-clock budget (epoch interruption) with fuel to spare, and fuel with time to spare.
    let (rt, _c1) = runtime(|c| {
        c.timeout_ms = 20;
        c.fuel = u64::MAX / 2;
    });
    assert!(matches!(run(&rt, "spin"), Err(Failure::Timeout(20))));
    let (rt, _c2) = runtime(|c| {
        c.timeout_ms = 10_000;
        c.fuel = 1_000_000;
    });
    assert!(matches!(run(&rt, "spin"), Err(Failure::OutOfFuel(1_000_000))));

    let (rt, _c3) = runtime(|c| {
        c.timeout_ms = 10_000;
        c.memory_limit_bytes = 4 * 1024 * 1024;
    });
    assert!(matches!(run(&rt, "memory-bomb"), Err(Failure::MemoryLimit(4_194_304))));
    assert!(matches!(run(&rt, "deep-recursion"), Err(Failure::StackOverflow)));
    assert!(matches!(run(&rt, "panic"), Err(Failure::Trap(m)) if m.contains("unreachable")));
    // The log flood is cut to a few lines per call and decides normally.
    assert!(matches!(run(&rt, "log-flood"), Ok(Decision::Allow)));
    // The fixtures behave when not attacked (that is how they pass an upload's dry run).
    let calm = ctx("ur5e", "pick", vec![0.0; 7]);
    let spin = compile(&rt, "spin", World::Safety);
    assert!(matches!(evaluate(&rt, &spin, "{}", &calm, &a), Ok(Decision::Allow)));
}

#[test]
fn components_that_ask_for_more_than_the_world_are_refused_at_compile_time() {
    let (rt, _cache) = runtime(|_| {});
    let wasi = std::fs::read(common::policy_path("wasi-filesystem")).unwrap();
    let error = rt.compile(&wasi, World::Safety).unwrap_err();
    assert!(error.contains("`wasi:filesystem/types@0.2.6`") && error.contains("no WASI"), "{error}");
    let filter = std::fs::read(common::policy_path("instruction-filter")).unwrap();
    let error = rt.compile(&filter, World::Safety).unwrap_err();
    assert!(error.contains("implements the admission world"), "{error}");
    assert!(rt.compile(b"\0asm\x01\0\0\0", World::Safety).unwrap_err().contains("core WebAssembly module"));
    assert!(rt.compile(b"garbage", World::Safety).unwrap_err().contains("bad magic"));
    // A truncated component is invalid, not a crash.
    let joint = std::fs::read(common::policy_path("joint-limits")).unwrap();
    assert!(rt.compile(&joint[..joint.len() / 2], World::Safety).unwrap_err().contains("invalid component"));
}
