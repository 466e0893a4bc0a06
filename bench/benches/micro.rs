//! Criterion micro-benchmarks of the request path's hot pieces: image decode + preprocess,
//! batch assembly and split, one policy call, one quota decision, metric recording and the
//! `/metrics` render. `cargo bench -p bench --bench micro` (add `-- --test` to run each once).

use std::sync::Arc;
use std::time::Duration;

use appliance::model::{LoadedModel, TensorData};
use bench::fixtures;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn preprocess(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let work = fixtures::Workload::load(&fixtures::demo_model(tmp.path()).expect("demo model")).expect("loads");
    let limits = appliance::config::LimitsConfig::default();
    let mut group = c.benchmark_group("preprocess");
    for (w, h) in [(320, 240), (640, 480)] {
        let jpeg = fixtures::jpeg(w, h, 1);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("decode+resize+normalise", format!("{w}x{h}")), &jpeg, |b, jpeg| {
            b.iter(|| {
                let probe = appliance::preprocess::probe(jpeg, &limits).expect("fits");
                appliance::preprocess::camera_input(jpeg, &probe, &work.spec.cameras[0]).expect("decodes")
            })
        });
        // A robot's whole row: decode, preprocess, tokens, state.
        group.bench_with_input(BenchmarkId::new("robot row", format!("{w}x{h}")), &jpeg, |b, jpeg| {
            b.iter(|| work.robot_sample(&[jpeg.as_slice()], 1, &limits).expect("valid"))
        });
    }
    group.finish();
}

fn batch(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = fixtures::demo_model(tmp.path()).expect("demo model");
    let work = fixtures::Workload::load(&dir).expect("loads");
    let model = LoadedModel::load(&dir, &work.spec, tch::Device::Cpu).expect("loads");
    let sample = work.sample(0);
    let mut group = c.benchmark_group("batch");
    for n in [1usize, 8, 32] {
        let samples: Vec<&[TensorData]> = (0..n).map(|_| sample.as_slice()).collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("assemble (stack inputs)", n), &samples, |b, samples| {
            b.iter(|| model.stack(samples).expect("stacks"))
        });
        let actions = tch::Tensor::ones([n as i64, 7], (tch::Kind::Float, tch::Device::Cpu));
        group.bench_with_input(BenchmarkId::new("split (actions per sample)", n), &actions, |b, actions| {
            b.iter(|| model.split(std::slice::from_ref(actions), n).expect("splits"))
        });
    }
    group.finish();
}

fn policy(c: &mut Criterion) {
    use appliance::policy::World;
    use appliance::policy::bindings::{Action, ActionKind};
    use appliance::policy::runtime::{Input, Runtime};
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/dist");
    let cache = tempfile::tempdir().expect("temp dir");
    let runtime = Runtime::new(&appliance::config::PolicyConfig::default(), cache.path()).expect("policy runtime");
    let ctx = fixtures::policy_context();
    let action = Action {
        kind: ActionKind::JointVelocity,
        dof: 7,
        horizon: 1,
        values: vec![0.3, -0.4, 0.1, 0.27, 0.0, 0.1, 0.2],
    };
    let mut group = c.benchmark_group("policy call (fresh instance)");
    for (name, world, config, input) in [
        ("joint-limits", World::Safety, r#"{"default": {"velocity": 0.25}}"#, Input::Evaluate(&ctx, &action)),
        (
            "instruction-filter",
            World::Admission,
            r#"{"deny": ["disable safety", "ignore * limits"]}"#,
            Input::Admit(&ctx),
        ),
    ] {
        let bytes = std::fs::read(dist.join(format!("{name}.wasm"))).expect("policies/dist (policies/build.sh)");
        let compiled = runtime.compile(&bytes, world).expect("compiles");
        let (policy, config): (Arc<str>, Arc<str>) = (name.into(), config.into());
        group.bench_function(name, |b| b.iter(|| runtime.call(&compiled, &policy, &config, input).expect("decides")));
    }
    group.finish();
}

fn quota(c: &mut Criterion) {
    use appliance::quota::{Limits, Quotas, Rate, Scope};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = std::sync::Arc::new(appliance::store::Store::open(dir.path()).expect("store"));
    let config = appliance::config::QuotaConfig { durability: "interval:100".into(), ..Default::default() };
    let quotas = Quotas::open(store, &config).expect("quotas");
    let limits = Limits {
        rate: Some(Rate { requests: u64::MAX / 4, period_ms: 1_000, burst: u64::MAX / 4 }),
        day: Some(u64::MAX / 4),
        month: None,
    };
    c.bench_function("quota decision (robot + group, interval)", |b| {
        b.iter(|| {
            let now = appliance::clock::now_ms();
            for (scope, key) in [(Scope::Robot, "arm-1"), (Scope::Group, "line-a")] {
                quotas.try_consume(scope, key, limits, 1, true, now).expect("allowed");
            }
        })
    });
}

fn metrics(c: &mut Criterion) {
    use appliance::metrics::{Family, Metrics};
    let m = Metrics::new();
    let model = m.for_model("tiny-vla");
    let policy = m.safety_duration.with_label_values(&["joint-limits"]);
    let d = Duration::from_micros(8_000);
    c.bench_function("metrics: one request recorded", |b| {
        b.iter(|| {
            m.request("tiny-vla", "arm", "success");
            model.duration.observe(d.as_secs_f64());
            m.http("POST", "/v1/inference", 200, d, None);
            for _ in 0..4 {
                policy.observe(0.00004);
            }
            m.cached(Family::SafetyChecks, &["allow"]).inc();
            model.queue_wait.observe(0.002);
            model.image_decode.observe(0.0008);
        })
    });
    for r in 0..50 {
        let id = format!("arm-{r:02}");
        m.rate_limit_remaining.with_label_values(&[&id, "rate"]).set(40);
        m.quota_usage.with_label_values(&[&id, "day"]).set(10.0);
        m.cached(Family::RateLimitHits, &[&id, "rate"]).inc();
        for model in ["tiny-vla", "pick-place-v2", "mobile-nav"] {
            m.request(model, "arm", "success");
        }
    }
    c.bench_function("metrics: /metrics render (3 models, 50 robots)", |b| b.iter(|| m.render().expect("renders")));
}

criterion_group! {
    name = micro;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = preprocess, batch, policy, quota, metrics
}
criterion_main!(micro);
