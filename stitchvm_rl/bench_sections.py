"""The sections of jobs/bench.py: each measures one comparison side by side in this process (or on
Ray actors it starts) and returns a JSON-able dict of every repeat's numbers (`bench_table.table`
renders them). Each takes the job's `BenchConfig` as `cfg` and reads the fields it needs (device,
dtype, repeats, quick, ...); see jobs/bench.py for what every section measures."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from stitchvm_rl import benchmark, costs, flow, nft, rewards, toyworld, zoo
from stitchvm_rl.benchmark import cores, interleaved, ratio, spread, summarise
from stitchvm_rl.value import default_value_model
from stitchvm_rl.weight_sync import push_adapter


def value_model_dir(cfg) -> str:
    """The value model every stitchvm section uses: the one given, or the backbone's default."""
    return cfg.value_model or default_value_model(cfg.backbone)


def bench_nft_epoch(cfg, value_dir: str) -> dict:
    """One epoch as the system runs it, without Ray in the way: an actor's rollout + scoring, then the
    learner's NFT micro-steps and one AdamW step (plain torch here; DeepSpeed in jobs/nft.py)."""
    from stitchvm_rl.learner import NFTTrainConfig, nft_micro_step, timesteps_per_group, train_timesteps
    from stitchvm_rl.policy import SD3Policy
    from stitchvm_rl.rollout import RolloutConfig, RolloutWorker

    rollout, train = RolloutConfig(dtype=cfg.dtype), NFTTrainConfig(lr=1e-3)
    prompts = toyworld.CAPTIONS[: cfg.groups]
    workers = {e: RolloutWorker(cfg.backbone, dataclasses.replace(rollout, estimator=e), cfg.rewards, [value_dir] if e == "stitchvm" else [], cfg.device) for e in ("terminal", "stitchvm")}
    learner = SD3Policy.from_pretrained(cfg.backbone, dtype=cfg.dtype, device=cfg.device)
    learner.add_lora(rollout.lora_rank, rollout.lora_alpha)
    optimizer = torch.optim.AdamW([p for p in learner.transformer.parameters() if p.requires_grad], lr=train.lr)
    schedule = flow.sd3_sigmas(rollout.num_steps, scheduler_config=learner.pipe.scheduler.config)
    calls = {e: benchmark.TransformerCalls(w.policy.transformer) for e, w in workers.items()}
    learner_calls = benchmark.TransformerCalls(learner.transformer)
    phases: dict[str, list[dict]] = {e: [] for e in workers}

    def epoch(estimator: str) -> None:
        worker = workers[estimator]
        batch = worker.rollout(prompts, seed=len(phases[estimator]))
        sampling = calls[estimator].take()
        benchmark.sync(cfg.device)
        t0 = time.perf_counter()
        r = nft.optimality_probability(batch.scores, batch.groups, train.adv_clip)
        gen = torch.Generator().manual_seed(len(phases[estimator]))
        per_group = timesteps_per_group(dataclasses.replace(rollout, estimator=estimator), train.timestep_fraction)
        for group in range(len(prompts)):
            tau = float(batch.tau[batch.groups == group][0])
            for t in train_timesteps(schedule, tau, per_group, gen).tolist():
                loss, _ = nft_micro_step(learner, batch, group, r, t, train, gen)
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        benchmark.sync(cfg.device)
        samples = len(batch.scores)
        phases[estimator].append({
            "sample": batch.seconds_sample, "score": batch.seconds_score, "train": time.perf_counter() - t0,
            "rollout_evals_per_sample": sampling / samples, "train_forwards_per_sample": learner_calls.take() / samples,
            "samples": samples,
        })

    seconds = interleaved({e: (lambda e=e: epoch(e)) for e in workers}, cfg.repeats, cfg.device)
    out = {"seconds_per_epoch": summarise(seconds), "samples_per_epoch": phases["terminal"][-1]["samples"]}
    out["speedup_stitchvm_over_terminal"] = ratio(seconds["terminal"], seconds["stitchvm"])
    for e in workers:
        runs = phases[e][1:]  # the warm-up round is dropped, as in `interleaved`
        out[e] = {k: statistics.median(p[k] for p in runs) for k in runs[0] if k != "samples"}
        out[e]["samples_per_second"] = out["samples_per_epoch"] / statistics.median(seconds[e])
    # what a count of sampling steps alone would predict (mean stop k of U{stop_min..stop_max})
    out["step_count_prediction"] = rollout.num_steps / ((rollout.stop_min + rollout.stop_max) / 2)
    terminal, stitch = out["terminal"], out["stitchvm"]
    out["transformer_evals_ratio"] = (terminal["rollout_evals_per_sample"] + terminal["train_forwards_per_sample"]) / (stitch["rollout_evals_per_sample"] + stitch["train_forwards_per_sample"])
    return out


def bench_draft_step(cfg, value_dir: str) -> dict:
    """One DRaFT-K micro-step per estimator, side by side in this process (plain torch AdamW here;
    DeepSpeed in jobs/draft.py): seconds per step (forward + backward), and per sample the rows
    through the policy's transformer (sampling, the regulariser's base velocity, the checkpointed
    steps' recomputation), VAE decodes and value-model evaluations."""
    from stitchvm_rl.draft import DraftRolloutConfig, draft_loss, stop_index, terminal_objective, value_objective
    from stitchvm_rl.policy import SD3Policy
    from stitchvm_rl.value.model import StitchedValueModel

    policy = SD3Policy.from_pretrained(cfg.backbone, dtype=cfg.dtype, device=cfg.device)
    policy.add_lora(32, 64, float32=True)
    optimizer = torch.optim.AdamW([p for p in policy.transformer.parameters() if p.requires_grad], lr=1e-4)
    value_model = StitchedValueModel.from_pretrained(value_dir, device=cfg.device, dtype=cfg.dtype).requires_grad_(False)
    objectives = {"terminal": terminal_objective(policy, rewards.build_rewards(cfg.rewards, device=cfg.device)), "stitchvm": value_objective(policy, [value_model])}
    batch = cfg.groups * 2
    prompts = [toyworld.CAPTIONS[n % len(toyworld.CAPTIONS)] for n in range(batch)]
    counters = {"transformer": benchmark.TransformerCalls(policy.transformer), "decode": benchmark.TransformerCalls(policy.vae.decoder), "value": benchmark.TransformerCalls(value_model.stitch)}
    evals: dict[str, list[dict]] = {}
    results = {}
    for k in cfg.backprop_steps:
        configs = {e: DraftRolloutConfig(estimator=e, backprop_steps=k) for e in objectives}
        gen = torch.Generator().manual_seed(0)

        def step(estimator: str) -> None:
            draft = configs[estimator]
            loss, _ = draft_loss(policy, draft, prompts, policy.initial_noise(batch, gen), stop_index(draft, gen), objectives[estimator])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            evals.setdefault(estimator, []).append({name: c.take() / batch for name, c in counters.items()})

        for c in counters.values():
            c.take()
        seconds = interleaved({e: (lambda e=e: step(e)) for e in objectives}, cfg.repeats, cfg.device)
        timed = {e: evals.pop(e)[1:] for e in objectives}  # the warm-up round is dropped, as in `interleaved`
        per_sample = {e: {name: statistics.mean(r[name] for r in timed[e]) for name in counters} for e in objectives}
        results[f"K={k}"] = {
            "seconds_per_step": summarise(seconds),
            "speedup_stitchvm_over_terminal": ratio(seconds["terminal"], seconds["stitchvm"]),
            "evals_per_sample": per_sample,
        }
    stop = DraftRolloutConfig()
    return {"samples_per_step": batch, "num_steps": stop.num_steps, "stop_window": [stop.stop_min, stop.stop_max], "by_k": results}


def bench_nft_reach(cfg, value_dir: str, scratch: Path, nft_main) -> dict:
    """Train both estimators with jobs/nft.py (`nft_main`: its main; Ray, DeepSpeed) and compare time to the baseline's reward."""
    from stitchvm_rl import report

    epochs = {"terminal": 2, "stitchvm": 4} if cfg.quick else {"terminal": cfg.reach_epochs, "stitchvm": cfg.reach_epochs_stitchvm}
    # no drift checks: they watch the value model and are not counted in an epoch's seconds anyway
    common = [f"output_dir={scratch}", f"value_models=[{value_dir}]", f"ray_cpus={cfg.ray_cpus}", "drift_every=0"]
    if cfg.quick:
        common += ["eval_every=2", "eval_prompts=8", "groups_per_epoch=2"]
    summaries, runs = {}, []
    for estimator, n in epochs.items():
        result = nft_main([*common, "run_name=reach", f"compare=[{estimator}]", f"epochs={n}"])
        summaries |= result["runs"]
        runs += [report.load_run(d) for d in result["run_dirs"]]
    curves = report.by_estimator(runs)
    out = {"epochs": epochs, "speedups": report.speedups(curves, "terminal")}
    for run in runs:
        out[run.estimator] = {"seconds_per_epoch": summaries[run.name]["seconds_per_epoch"], "phases": run.phases, "eval_reward": dict(zip(run.steps, run.reward))}
    out["seconds_per_epoch_ratio"] = out["terminal"]["seconds_per_epoch"] / out["stitchvm"]["seconds_per_epoch"]
    return out


def _guided_models(cfg, value_dir: str):
    from stitchvm_rl.policy import SD3Policy
    from stitchvm_rl.value.model import StitchedValueModel

    policy = SD3Policy.from_pretrained(cfg.backbone, dtype=cfg.dtype, device=cfg.device)
    policy.transformer.requires_grad_(False)
    policy.vae.requires_grad_(False)
    reward = rewards.build_rewards(cfg.rewards, device=cfg.device)
    value_model = StitchedValueModel.from_pretrained(value_dir, device=cfg.device, dtype=cfg.dtype)
    return policy, reward, value_model


def bench_dps(cfg, value_dir: str, scales: dict[str, float]) -> dict:
    """Guided sampling of one batch with each value (jobs/dps.py's sampler and its default `scales`)."""
    from stitchvm_rl.guidance import GuidanceConfig, build_value, dps_sample

    policy, reward, value_model = _guided_models(cfg, value_dir)
    guidance = GuidanceConfig(num_steps=4 if cfg.quick else 20)
    prompts = [toyworld.CAPTIONS[n % len(toyworld.CAPTIONS)] for n in range(cfg.groups * 8)]
    noise = policy.initial_noise(len(prompts), torch.Generator().manual_seed(0))
    peaks: dict[str, list[float]] = {m: [] for m in ("none", "tweedie", "stitchvm")}

    def run(method: str) -> None:
        value = build_value(method, policy, reward, value_model)
        with benchmark.ExtraMemory(cfg.device) as extra:
            dps_sample(policy, prompts, value, dataclasses.replace(guidance, scale=scales.get(method, 0.0)), noise, torch.Generator().manual_seed(1))
        peaks[method].append(extra.mib)

    seconds = interleaved({m: (lambda m=m: run(m)) for m in peaks}, cfg.repeats, cfg.device)
    resident = {"none": [policy.transformer], "tweedie": [policy.transformer, policy.vae, reward], "stitchvm": [policy.transformer, value_model]}
    out = {
        "samples": len(prompts), "steps": guidance.num_steps,
        "seconds_per_sample": summarise(seconds, per=len(prompts)),
        "extra_peak_memory_mib": {m: spread(p[1:]) for m, p in peaks.items()},
        "model_memory_mib": {m: benchmark.model_mib(*mods) for m, mods in resident.items()},
        "speedup_stitchvm_over_tweedie": ratio(seconds["tweedie"], seconds["stitchvm"]),
    }
    peak = {m: out["model_memory_mib"][m] + out["extra_peak_memory_mib"][m]["median"] for m in peaks}
    out["peak_memory_mib"] = peak
    out["memory_ratio_stitchvm_over_tweedie"] = peak["stitchvm"] / peak["tweedie"]
    return out


def bench_value(cfg, value_dir: str) -> dict:
    """One estimate of E[r(z0) | z_t] at sigma = 0.5 for a batch of latents."""
    from stitchvm_rl.estimators import Estimators

    policy, reward, value_model = _guided_models(cfg, value_dir)
    k = 4
    est = Estimators(policy, value_model, reward, steps=10, cfg_scale=1.0, noise_level=0.7, batch_size=64)
    prompts = [toyworld.CAPTIONS[n % len(toyworld.CAPTIONS)] for n in range(cfg.groups * 8)]
    z = est.rollouts_to(0.5, prompts, seed=0)
    fns = {"stitchvm": lambda: est.stitchvm(z, 0.5, prompts), "tweedie": lambda: est.tweedie(z, 0.5, prompts), f"mc{k}": lambda: est.completions(z, 0.5, prompts, k, seed=0)}
    seconds = interleaved(fns, cfg.repeats, cfg.device)
    return {
        "sigma": 0.5, "latents": len(prompts),
        "seconds_per_estimate": summarise(seconds, per=len(prompts)),
        "speedup_stitchvm_over_tweedie": ratio(seconds["tweedie"], seconds["stitchvm"]),
        f"speedup_stitchvm_over_mc{k}": ratio(seconds[f"mc{k}"], seconds["stitchvm"]),
    }


def bench_rollout_scaling(cfg, value_dir: str) -> dict:
    """The same prompt groups served by n actors (one CPU each, one group per request, as the learner
    asks) against the same calls in this process with one thread: Ray's overhead and scaling."""
    import ray

    from stitchvm_rl import runtime
    from stitchvm_rl.rollout import RolloutConfig, RolloutWorker

    rollout = RolloutConfig(dtype=cfg.dtype)
    groups = [[toyworld.CAPTIONS[n % len(toyworld.CAPTIONS)]] for n in range(max(cfg.actors) * (1 if cfg.quick else 2))]
    runtime.init_ray(cfg.ray_cpus)
    actor_cls = ray.remote(RolloutWorker).options(num_cpus=1, num_gpus=1 if cfg.device == "cuda" else 0)
    actors = [actor_cls.remote(cfg.backbone, rollout, cfg.rewards, [value_dir], cfg.device) for _ in range(max(cfg.actors))]
    ray.get([a.__ray_ready__.remote() for a in actors])
    local = RolloutWorker(cfg.backbone, rollout, cfg.rewards, [value_dir], cfg.device)
    threads = torch.get_num_threads()

    def in_process() -> None:
        torch.set_num_threads(1)  # what an actor with num_cpus=1 gets (OMP_NUM_THREADS=1)
        try:
            for n, g in enumerate(groups):
                local.rollout(g, seed=n)
        finally:
            torch.set_num_threads(threads)

    def on_actors(count: int) -> None:
        ray.get([actors[n % count].rollout.remote(g, seed=n) for n, g in enumerate(groups)])

    fns = {"in_process": in_process, **{f"{n}_actors": (lambda n=n: on_actors(n)) for n in cfg.actors}}
    try:
        seconds = interleaved(fns, cfg.repeats)
    finally:
        for actor in actors:
            ray.kill(actor)
    samples = len(groups) * rollout.group_size
    rate = {name: samples / statistics.median(s) for name, s in seconds.items()}
    one = rate.get("1_actors")
    return {
        "samples": samples, "cores": cores(),
        "samples_per_second": rate,
        "seconds": summarise(seconds),
        "one_actor_over_in_process": one / rate["in_process"] if one else None,
        "scaling_over_one_actor": {name: r / one for name, r in rate.items() if one and name.endswith("_actors")},
    }


def bench_weight_sync(cfg) -> dict:
    """jobs/nft.py's sync path (`weight_sync.push_adapter`: one ray.put, every actor loads and answers
    with a checksum) for an adapter the size of SD3.5-Medium's LoRA."""
    import ray

    from stitchvm_rl import runtime
    from stitchvm_rl.policy import LORA_TARGETS

    dtype = "bfloat16" if cfg.device == "cuda" else "float32"
    shapes = benchmark.lora_shapes(zoo.meta_model("sd35_medium_transformer"), cfg.lora_rank, LORA_TARGETS)
    if cfg.quick:
        shapes = dict(list(shapes.items())[:8])
    state = benchmark.random_adapter(shapes, dtype)
    runtime.init_ray(cfg.ray_cpus)
    sink = ray.remote(benchmark.AdapterSink).options(num_cpus=0)
    sinks = [sink.remote(shapes, dtype) for _ in range(max(cfg.actors))]
    ray.get([s.__ray_ready__.remote() for s in sinks])
    try:
        seconds = interleaved({f"{n}_actors": (lambda n=n: push_adapter(state, sinks[:n])) for n in cfg.actors}, cfg.repeats)
    finally:
        for s in sinks:
            ray.kill(s)
    size = sum(t.numel() * t.element_size() for t in state.tensors.values())
    return {"adapter_mib": size / 2**20, "params": sum(t.numel() for t in state.tensors.values()), "dtype": dtype, "lora_rank": cfg.lora_rank, "seconds": summarise(seconds)}


def bench_real_scale(cfg) -> dict:
    """Cost model at SD3.5-M size: DPS step with and without CFG, and an NFT epoch's model evaluations."""
    from stitchvm_rl.learner import NFTTrainConfig, timesteps_per_group
    from stitchvm_rl.rollout import RolloutConfig

    out = {"dps_step": {}}
    for res in cfg.resolutions[:1] if cfg.quick else cfg.resolutions:
        for use_cfg in (True, False):
            out["dps_step"][f"{res}_cfg{int(use_cfg)}"] = costs.sd35m_guidance_step_costs(resolution=res, cfg=use_cfg)
    # NFT at the SD3.5-M configs' settings (jobs/configs/nft_sd35m_*.yaml): 25 steps, stop U{12..17}
    res = cfg.resolutions[0]
    model = costs.sd35m_value_model_costs(resolution=res)["forward_flops"]
    rollout = RolloutConfig(num_steps=25, stop_min=12, stop_max=17)
    fraction = NFTTrainConfig().timestep_fraction
    per_sample = {}
    for estimator in ("terminal", "stitchvm"):
        r = dataclasses.replace(rollout, estimator=estimator)
        steps = r.num_steps if estimator == "terminal" else (r.stop_min + r.stop_max) / 2
        score = model["vae_decode"] + model["clip_image"] if estimator == "terminal" else model["stitchvm"]
        # training: per timestep the old, reference and current velocities + the current one's backward (~2 forwards)
        train = timesteps_per_group(r, fraction) * 5
        per_sample[estimator] = {"sampling_steps": steps, "train_forward_equivalents": train, "tflops": ((steps + train) * model["sd35m_transformer"] + score) / 1e12}
    out["nft_epoch"] = {"resolution": res, "per_sample": per_sample, "step_count_prediction": per_sample["terminal"]["sampling_steps"] / per_sample["stitchvm"]["sampling_steps"],
                        "flops_ratio_terminal_over_stitchvm": per_sample["terminal"]["tflops"] / per_sample["stitchvm"]["tflops"]}
    return out


def bench_real_scale_timed(cfg) -> dict:
    """The real-scale DPS step (`costs.sd35m_guidance_steps`) with random weights on the GPU."""
    out = {}
    for res in cfg.resolutions[:1] if cfg.quick else cfg.resolutions:
        for use_cfg in (True, False):
            steps, resident = costs.sd35m_guidance_steps(resolution=res, cfg=use_cfg, device=cfg.device, dtype=cfg.dtype)
            if cfg.compile:  # the same step on fresh random models whose blocks are compiled (on first call)
                compiled, _ = costs.sd35m_guidance_steps(resolution=res, cfg=use_cfg, device=cfg.device, dtype=cfg.dtype, compile=True)
                steps |= {f"{m}_compiled": fn for m, fn in compiled.items()}
                resident |= {f"{m}_compiled": p for m, p in resident.items()}
            peaks: dict[str, list[float]] = {m: [] for m in steps}

            def run(method: str) -> None:
                with benchmark.ExtraMemory(cfg.device) as extra:
                    steps[method]()
                peaks[method].append(extra.mib)

            oom = []
            for method in list(steps):  # a method that does not fit is reported, not timed
                try:
                    run(method)
                except torch.cuda.OutOfMemoryError:
                    oom.append(method)
                    del steps[method], peaks[method]
                    torch.cuda.empty_cache()
            seconds = interleaved({m: (lambda m=m: run(m)) for m in steps}, cfg.repeats, cfg.device, warmup=0)
            weights = {m: p * zoo.DTYPES[cfg.dtype].itemsize / 2**20 for m, p in resident.items()}
            peak = {m: weights[m] + statistics.median(p) for m, p in peaks.items()}
            row = {"out_of_memory": oom, "seconds_per_step": summarise(seconds), "extra_peak_memory_mib": {m: spread(p) for m, p in peaks.items()}, "model_memory_mib": weights, "peak_memory_mib": peak}
            if not oom:
                row["speedup_stitchvm_over_tweedie"] = ratio(seconds["tweedie"], seconds["stitchvm"])
                if "stitchvm_shared" in seconds:  # the value model's head taken from CFG's unconditional pass
                    row["speedup_stitchvm_shared_over_tweedie"] = ratio(seconds["tweedie"], seconds["stitchvm_shared"])
                row["memory_ratio_stitchvm_over_tweedie"] = peak["stitchvm"] / peak["tweedie"]
                if cfg.compile:
                    row["speedup_stitchvm_over_tweedie_compiled"] = ratio(seconds["tweedie_compiled"], seconds["stitchvm_compiled"])
                    row["compile_speedup"] = {m: ratio(seconds[m], seconds[f"{m}_compiled"]) for m in ("none", "tweedie", "stitchvm")}
            out[f"{res}_cfg{int(use_cfg)}"] = row
            torch.cuda.empty_cache()
    return out


def bench_real_scale_nft(cfg) -> dict:
    """One prompt group of 8 images (the SD3.5-M configs sample 24) of an NFT epoch at SD3.5-M size with
    random weights: `costs.sd35m_nft_groups` at the configs' 25 steps, stop near the mean of U{12..17}
    and trained timesteps, 512^2, LoRA r `lora_rank`, training micro-batches of 4."""
    from stitchvm_rl.learner import NFTTrainConfig, timesteps_per_group
    from stitchvm_rl.rollout import RolloutConfig

    rollout, fraction = RolloutConfig(num_steps=25, stop_min=12, stop_max=17), NFTTrainConfig().timestep_fraction
    timesteps = {e: timesteps_per_group(dataclasses.replace(rollout, estimator=e), fraction) for e in ("terminal", "stitchvm")}
    group = 2 if cfg.quick else rollout.group_size
    kwargs = dict(group=group, resolution=cfg.resolutions[0], train_timesteps=timesteps, device=cfg.device, dtype=cfg.dtype, lora_rank=cfg.lora_rank)
    groups = costs.sd35m_nft_groups(**kwargs)
    if cfg.compile:  # fresh random models whose blocks compile in the warm-up round
        groups |= {f"{m}_compiled": fn for m, fn in costs.sd35m_nft_groups(**kwargs, compile=True).items()}
    phases: dict[str, list[dict]] = {m: [] for m in groups}
    seconds = interleaved({m: (lambda m=m: phases[m].append(groups[m]())) for m in groups}, cfg.repeats, cfg.device)
    medians = {m: {k: statistics.median(p[k] for p in runs[-cfg.repeats :]) for k in ("sample", "score", "train")} for m, runs in phases.items()}
    out = {"group": group, "resolution": cfg.resolutions[0], "train_timesteps": timesteps, "seconds_per_group": summarise(seconds), "phases": medians,
           "speedup_stitchvm_over_terminal": ratio(seconds["terminal"], seconds["stitchvm"])}
    if cfg.compile:
        out["speedup_stitchvm_over_terminal_compiled"] = ratio(seconds["terminal_compiled"], seconds["stitchvm_compiled"])
    return out
