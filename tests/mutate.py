"""Plant bugs one at a time in a copy of the package and see whether the tests notice.

Two modes (see tests/README.md):

    python tests/mutate.py planted                   # the hand-planted bugs of PLANTED, each must be killed
    python tests/mutate.py planted --only ema        # those whose name contains "ema" (any case)
    python tests/mutate.py auto src/mimkit/train/optim.py tests/train/test_optim.py tests/train/test_loop.py
                                                     # textual mutants of one module against its tests

Each mutant is written into a fresh copy of ``src/`` under a temporary folder and the tests run with
``PYTHONPATH`` pointing there, so the working tree is never modified. A mutant is *killed* when the tests
fail, *survives* when they pass, and counts as *timeout* when they run past ``--timeout`` seconds.
Stop a run with Ctrl-C: the running tests are killed and the temporary copy is removed.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    """A planted bug: in ``path``, replace ``old`` (which must occur exactly once) by ``new``."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files that must fail


# sweepevalx: what a fine-tuning run reports at its end
FINETUNE_RESULTS = ("tests/eval/test_finetune.py::"
                    "test_a_finetune_run_reports_its_splits_length_and_test_numbers")
SEG = "tests/eval/test_segment.py::"  # sweepevalx
# the VQ-KD k-means tests (the file's other tests include a Fashion-MNIST run)
# region decoding's pixels against the whole image's, at full size and at the DCT scales
REGION_PIXELS = "tests/data/test_jpeg_region.py"
# one case of the probes' sweep of flags
PROBE_FLAG_REACHES = "tests/eval/test_probe_settings.py::test_a_non_default_flag_reaches_the_probe"
VQKD_KMEANS = ("tests/tokenizers/test_vqkd.py::test_the_first_batch_sets_the_codebook_by_kmeans",
               "tests/tokenizers/test_vqkd.py::test_the_recipe_and_its_overrides_reach_the_quantizer")

# sweepmethods: the tests its planted bugs name
D2V_PICTURES = ("tests/methods/test_data2vec.py::"
                "test_the_pictures_hide_the_masked_patches_and_draw_each_patchs_cosine_to_its_target")
CAE_PICTURE = ("tests/methods/test_cae.py::"
               "test_the_picture_decodes_the_decoders_ids_at_the_hidden_patches_and_the_tokenizers_elsewhere")
BEIT_TOKENIZER_NORM = ("tests/methods/test_beit.py::"
                       "test_the_tokenizers_images_are_normalized_as_it_was_trained_not_as_the_run")
BEITV2_TOKENIZER_NORM = ("tests/methods/test_beitv2.py::"
                         "test_the_tokenizers_images_are_normalized_as_its_run_was_not_as_this_run")
VQKD_HELD_OUT = ("tests/tokenizers/test_vqkd.py::"
                 "test_the_held_out_evaluation_tokenizes_a_seeded_subset_of_the_val_split")
SETTING_REACHES = ("tests/methods/test_settings_reach.py::"
                   "test_a_non_default_setting_changes_what_a_training_step_gives")

PLANTED = [
    Bug("layer decay: the loop ignores lr_scale", "src/mimkit/train/step.py",
        'group["lr"] = lr * group.get("lr_scale", 1.0)', 'group["lr"] = lr',
        ("tests/train/test_optim.py",)),
    Bug("layer decay: finetune does not ask for it", "src/mimkit/eval/finetune.py",
        "param_groups(model, optim.weight_decay, optim.layer_decay, len(model.classifier.blocks))",
        "param_groups(model, optim.weight_decay)",
        ("tests/train/test_optim.py::test_finetune_runs_with_layer_decay",)),
    Bug("label seed: make_splits ignores it", "src/mimkit/eval/subsets.py",
        "label_subset([labels[i] for i in train], label_fraction, seed)",
        "label_subset([labels[i] for i in train], label_fraction)", ("tests/eval/test_subsets.py",)),
    Bug("label seed: probes drop --seed", "src/mimkit/cli.py",
        "seed=args.seed, cache_dir=args.features_cache", "seed=0, cache_dir=args.features_cache",
        ("tests/eval/test_subsets.py::test_probe_seed_flag_picks_the_subset",)),
    Bug("label seed: finetune drops labels.seed", "src/mimkit/eval/finetune.py",
        "make_splits(source, labels.fraction, labels.val_fraction, labels.seed)",
        "make_splits(source, labels.fraction, labels.val_fraction)",
        ("tests/eval/test_subsets.py::test_finetune_labels_seed_picks_the_subset",)),
    Bug("features cache: --features-cache ignored", "src/mimkit/cli.py",
        "cache_dir=args.features_cache", "cache_dir=None",
        ("tests/eval/test_subsets.py::test_probe_seed_flag_picks_the_subset",)),
    Bug("k-means: never runs", "src/mimkit/tokenizers/quantizer.py",
        'register_buffer("initialized", torch.tensor(kmeans_iters == 0))',
        'register_buffer("initialized", torch.tensor(True))', ("tests/tokenizers/test_quantizer.py",)),
    Bug("k-means: one round only", "src/mimkit/tokenizers/quantizer.py",
        "for _ in range(iters):", "for _ in range(min(iters, 1)):", ("tests/tokenizers/test_quantizer.py",)),
    Bug("DDP accumulation: gradients of each micro-batch not divided", "src/mimkit/train/step.py",
        "(loss / accum_steps).backward()", "loss.backward()", ("tests/train/test_distributed.py",)),
    Bug("DDP accumulation: no gradient sync at all", "src/mimkit/train/step.py",
        "sync = micro == accum_steps - 1 or self.world.size == 1", "sync = self.world.size == 1",
        ("tests/train/test_distributed.py",)),
    Bug("accumulation: the last micro-batch's metrics are logged for the step", "src/mimkit/train/step.py",
        "metric_sums[name] = metric_sums.get(name, 0.0) + _detached(value)",
        "metric_sums[name] = _detached(value) * accum_steps",
        ("tests/train/test_step.py::test_the_log_averages_the_loss_and_metrics_of_every_micro_batch",)),
    Bug("DDP resume: every rank restores rank 0's RNG", "src/mimkit/train/training_state.py",
        'rank = world.rank if world.rank < len(state["cpu"]) else 0', "rank = 0",
        ("tests/train/test_distributed.py",)),
    Bug("EMA: finetune never updates it", "src/mimkit/eval/finetune.py",
        "after_step=model.update_ema if config.ema_decay else None", "after_step=None",
        ("tests/eval/test_finetune.py::test_finetune_cli_from_pretrained_random_and_finetuned",)),
    Bug("EMA: reported numbers are the weights'", "src/mimkit/eval/finetune.py",
        "ema = classification_accuracy(model.ema.module,", "ema = classification_accuracy(model.classifier,",
        ("tests/eval/test_ema.py",)),
    Bug("EMA: updated without the step", "src/mimkit/models/classifier.py",
        "self.ema.update(self.classifier, step)", "self.ema.update(self.classifier)",
        ("tests/eval/test_ema.py",)),
    Bug("pictures: norm-pix left in the reconstruction", "src/mimkit/viz.py",
        "if model.norm_pix_loss:", "if not model.norm_pix_loss:", ("tests/test_viz.py",)),
    Bug("pictures: pasted panel takes visible patches from the reconstruction", "src/mimkit/viz.py",
        '"pasted": images * (1 - patch_mask) + reconstruction * patch_mask}',
        '"pasted": reconstruction * (1 - patch_mask) + images * patch_mask}', ("tests/test_viz.py",)),
    Bug("pictures: BEiT prediction panel decodes the tokenizer's ids", "src/mimkit/viz.py",
        '"prediction": tokenizer.decode(predicted)}', '"prediction": tokenizer.decode(ids)}',
        ("tests/test_viz.py",)),
    Bug("true by construction: mim_acc of the wrong guess", "src/mimkit/models/beit.py",
        "acc = (logits.detach().argmax(-1) == targets)", "acc = (logits.detach().argmin(-1) == targets)",
        ("tests/models/test_beit.py",)),
    Bug("true by construction: usage counts codes hit twice", "src/mimkit/tokenizers/dvae.py",
        '"usage": (counts > 0).float().mean()', '"usage": (counts > 1).float().mean()',
        ("tests/tokenizers/test_dvae.py::test_codebook_stats",)),
    Bug("true by construction: probes read shuffled labels", "src/mimkit/eval/features.py",
        "return features[wanted], labels[wanted]", "return features[wanted], labels[wanted.flip(0)]",
        ("tests/eval/test_finetune.py::test_probe_cli",)),
    Bug("README: --resume accepts an empty run directory", "src/mimkit/cli.py",
        "if must_resume and not has_checkpoint:", "if must_resume and has_checkpoint is None:",
        ("tests/test_cli_contract.py::test_resume_insists_on_a_checkpoint",)),
    Bug("README: Ctrl-C kills the run without a checkpoint", "src/mimkit/train/loop.py",
        "for s in (signal.SIGINT, signal.SIGTERM)}", "for s in (signal.SIGTERM,)}",
        ("tests/test_cli.py::test_a_signal_to_the_whole_job_saves_a_checkpoint_and_the_run_resumes",)),
    Bug("README: --skip-bad-images ignored by the CLI", "src/mimkit/cli.py",
        "    if args.skip_bad_images:\n", "    if args.skip_bad_images and False:\n",
        ("tests/test_cli_contract.py::test_skip_bad_images_through_the_cli_and_its_cap",)),
    Bug("README: data.max_bad_images ignored", "src/mimkit/pretrain.py",
        "max_bad_images=data.max_bad_images,", "max_bad_images=100,",
        ("tests/test_cli_contract.py::test_skip_bad_images_through_the_cli_and_its_cap",)),
    Bug("README: --config FILE.yaml ignored", "src/mimkit/cli.py",
        "    if args.config:\n", "    if False:\n",
        ("tests/test_cli_contract.py::test_config_file_is_the_recipe",)),
    Bug("README: folders get the _fmnist recipe", "src/mimkit/cli.py",
        'return f"{method}_in1k", "the paper\'s ImageNet-1K recipe"',
        'return f"{method}_fmnist", "the paper\'s ImageNet-1K recipe"',
        ("tests/test_cli_contract.py",)),
    Bug("README: a resumed run starts with a fresh optimizer", "src/mimkit/train/training_state.py",
        'self.optimizer.load_state_dict(state["optimizer"])', "pass",
        ("tests/test_cli_contract.py::test_an_interrupted_fine_tuning_run_resumes_bit_for_bit",)),
    Bug("README: no TensorBoard scalars", "src/mimkit/train/metrics_log.py",
        "self.tensorboard.add_scalar(key, value, step)", "pass",
        ("tests/test_cli_contract.py::test_metrics_reach_tensorboard_when_it_is_installed",)),
    Bug("README: import --img-size ignored", "src/mimkit/cli.py",
        "img_size=args.img_size,", "img_size=None,",
        ("tests/test_cli_contract.py::test_import_img_size_resizes_the_position_tables",)),
    Bug("README: import --allow-mismatch ignored", "src/mimkit/cli.py",
        "allow_mismatch=args.allow_mismatch,", "allow_mismatch=False,",
        ("tests/test_cli_contract.py::test_import_allow_mismatch_loads_the_rest",)),
    Bug("README: import --set ignored", "src/mimkit/cli.py",
        "overrides=parse_overrides(args.set),", "overrides={},",
        ("tests/test_cli_contract.py::test_import_set_configures_the_run",)),
    Bug("fine-tuning view: RandAugment never applied", "src/mimkit/eval/augment.py",
        "auto_augment=auto_augment or None,", "auto_augment=None,", ("tests/eval/test_finetune_view.py",)),
    Bug("fine-tuning view: random erasing never applied", "src/mimkit/eval/augment.py",
        "if self.erasing:", "if False:", ("tests/eval/test_finetune_view.py",)),
    Bug("fine-tuning view: a worker's random erasing drawn outside the sample's seed",
        "src/mimkit/data/loader.py",
        "            if self.staged and not self.uint8:  # under the sample's seed: it may draw\n"
        "                out = self.view.on_device(out)\n"
        "        finally:\n            rng.set_state(saved)\n",
        "        finally:\n            rng.set_state(saved)\n        if self.staged and not self.uint8:\n"
        "            out = self.view.on_device(out)\n", ("tests/eval/test_finetune_view.py",)),
    Bug("crop decoding: a label subset's items read from the wrong images", "src/mimkit/data/loader.py",
        "return source.dataset, source.indices", "return source.dataset, range(len(source))",
        ("tests/data/test_crop_decode.py",)),
    Bug("fine-tuning view: the batch finished on the device is not normalized", "src/mimkit/eval/augment.py",
        'images = self.normalize(batch["image"])', 'images = batch["image"].float()',
        ("tests/eval/test_augment.py",)),
    Bug("reliability 2: a symlinked folder already listed is walked again", "src/mimkit/data/image_files.py",
        "if identity in seen:", "if False:",
        ("tests/data/test_sources.py::test_symlink_loops_are_listed_once_and_named",)),
    Bug("reliability 2: a resume reads what is left of the shards", "src/mimkit/data/sources.py",
        "    if missing:\n", "    if False:\n",
        ("tests/data/test_shards.py::test_a_run_keeps_its_shard_members_and_refuses_fewer",)),
    Bug("reliability 2: a shard cut at a member boundary is read", "src/mimkit/data/shards.py",
        "if marker != tarfile.NUL * tarfile.BLOCKSIZE:", "if False:",
        ("tests/data/test_shards.py::test_a_shard_cut_at_a_member_boundary_is_refused",)),
    Bug("reliability 2: a torn last metrics line is an error", "src/mimkit/train/metrics_log.py",
        "if number < len(lines):", "if True:",
        ("tests/train/test_metrics_log.py", "tests/test_reliability_data.py::"
         "test_a_torn_last_metrics_line_does_not_block_the_resume")),
    Bug("teachers: loading one draws from the run's random stream", "src/mimkit/methods/vqkd.py",
        "    with torch.random.fork_rng(devices=[]):\n        return load_teacher(",
        "    if True:\n        return load_teacher(",
        ("tests/methods/test_maskdistill.py::test_loading_the_teacher_leaves_the_runs_random_stream_alone",)),
    Bug("opened run: a resumed run keeps the records logged past its checkpoint",
        "src/mimkit/train/progress.py",
        "        metrics.drop_after(start_step)\n", "",
        ("tests/train/test_loop.py::test_resume_mid_epoch_is_bitwise_identical",)),
    Bug("opened run: TensorBoard's folder made before the first record", "src/mimkit/train/metrics_log.py",
        '        self.path = Path(run_dir) / "metrics.jsonl"\n',
        '        self.path = Path(run_dir) / "metrics.jsonl"\n        self.tensorboard  # noqa: B018\n',
        ("tests/test_cli_contract.py::test_metrics_reach_tensorboard_when_it_is_installed",)),
    Bug("reliability 2: NaN passes the number check", "src/mimkit/config.py",
        "if math.isfinite(value) and inside:", "if inside or value != value:",
        ("tests/test_reliability_run.py::test_probes_check_their_numbers_like_the_trainers",
         "tests/test_reliability_run.py::test_bad_numbers_are_one_line_errors")),
    Bug("reliability 2: linprobe takes any batch size", "src/mimkit/eval/config.py",
        'check_range("--batch-size", self.batch_size, 1)', "pass",
        ("tests/test_reliability_run.py::test_probes_check_their_numbers_like_the_trainers",)),
    Bug("reliability 2: a full disk torch.save does not name is a traceback", "src/mimkit/files.py",
        "if error_number(err) is None and free < FULL_BELOW:", "if False:",
        ("tests/test_reliability_data.py::test_a_full_disk_that_torch_save_does_not_name_is_one_line",)),
    Bug("reliability 2: no free-space check before a checkpoint", "src/mimkit/train/checkpoint_files.py",
        "check_free_space(self.state_path(step), ", "(self.state_path(step), ",
        ("tests/test_reliability_data.py::test_a_full_disk_that_torch_save_does_not_name_is_one_line",)),
    Bug("reliability 2: probes write into any folder", "src/mimkit/runs.py",
        "if not empty and owner != command and not force:", "if False:",
        ("tests/test_reliability_run.py::test_probes_write_only_into_a_folder_they_made_unless_forced",)),
    Bug("reliability 2: a forced export keeps a killed export's leftovers", "src/mimkit/interop/export.py",
        "            remove_temporaries(out)", "            pass",
        ("tests/test_reliability_data.py::test_a_forced_export_removes_what_a_killed_export_left",)),
    Bug("segmentation loss: ignore index dropped", "src/mimkit/eval/segment.py",
        "ignore_index=IGNORE_INDEX)", ")",
        ("tests/eval/test_segment.py::test_segmentation_loss_leaves_ignored_pixels_out",)),
    Bug("segmentation flip: the flipped image's logits not flipped back", "src/mimkit/eval/seg_metrics.py",
        "once(x.flip(-1)).flip(-1)", "once(x.flip(-1))", ("tests/eval/test_seg_metrics.py",)),
    Bug("segmentation window: the sum over windows, not the mean", "src/mimkit/eval/seg_metrics.py",
        "return total / count", "return total", ("tests/eval/test_seg_metrics.py",)),
    Bug("segmentation window: a pixel counted once however many windows cover it",
        "src/mimkit/eval/seg_metrics.py", "count[:, :, top:top + h, left:left + w] += 1",
        "count[:, :, top:top + h, left:left + w] = 1", ("tests/eval/test_seg_metrics.py",)),
    Bug("segmentation head lr: the heads decayed as layers (the pyramid's blocks)",
        "src/mimkit/eval/segment.py",
        "+ param_groups(heads, weight_decay))",
        "+ param_groups(heads, weight_decay, layer_decay, len(model.encoder.blocks)))",
        ("tests/eval/test_segment.py::test_layer_decay_covers_the_encoder_blocks_and_leaves_the_heads_at_scale_1",)),
    Bug("segmentation head lr: the heads at the embeddings' lr", "src/mimkit/eval/segment.py",
        "+ param_groups(heads, weight_decay))",
        '+ [g | {"lr_scale": layer_decay ** (len(model.encoder.blocks) + 1)} '
        "for g in param_groups(heads, weight_decay)])",
        ("tests/eval/test_segment.py::test_layer_decay_covers_the_encoder_blocks_and_leaves_the_heads_at_scale_1",)),
    Bug("segmentation head lr: no layer decay over the encoder", "src/mimkit/eval/segment.py",
        "param_groups(model.encoder, weight_decay, layer_decay, len(model.encoder.blocks))",
        "param_groups(model.encoder, weight_decay)",
        ("tests/eval/test_segment.py::test_layer_decay_covers_the_encoder_blocks_and_leaves_the_heads_at_scale_1",)),
    Bug("segmentation window: the last window not flush with the border", "src/mimkit/eval/seg_metrics.py",
        "max(min(i * stride, length - crop), 0)", "max(i * stride, 0)",
        ("tests/eval/test_seg_metrics.py::test_the_last_window_is_flush_with_the_border",)),
    Bug("segmentation whole image: resized by nearest", "src/mimkit/eval/seg_metrics.py",
        'images = F.interpolate(images, size=(crop, crop), mode="bilinear", align_corners=False)',
        'images = F.interpolate(images, size=(crop, crop), mode="nearest")',
        ("tests/eval/test_seg_metrics.py::test_whole_image_inference_resizes_bilinearly_to_the_crop_and_back",)),
    Bug("segmentation loss: logits upsampled with align_corners=True", "src/mimkit/eval/segment.py",
        'mode="bilinear", align_corners=False), masks,', 'mode="bilinear", align_corners=True), masks,',
        ("tests/eval/test_segment.py::test_segmentation_loss_upsamples_coarse_logits_bilinearly",)),
    Bug("segmentation head lr: the heads get no weight decay", "src/mimkit/eval/segment.py",
        "+ param_groups(heads, weight_decay))", "+ param_groups(heads, 0.0))",
        ("tests/eval/test_segment.py::test_layer_decay_covers_the_encoder_blocks_and_leaves_the_heads_at_scale_1",)),
    Bug("all-reduce count: gradients synced on every micro-batch", "src/mimkit/train/step.py",
        "sync = micro == accum_steps - 1 or self.world.size == 1", "sync = True",
        ("tests/train/test_step.py::test_gradients_are_all_reduced_once_per_optimizer_step_under_accumulation",)),
    Bug("all-reduce count (fast tier): no gradient sync at all", "src/mimkit/train/step.py",
        "sync = micro == accum_steps - 1 or self.world.size == 1", "sync = self.world.size == 1",
        ("tests/train/test_step.py::test_gradients_are_all_reduced_once_per_optimizer_step_under_accumulation",)),
    Bug("all-reduce count (fast tier): gradients of each micro-batch not divided", "src/mimkit/train/step.py",
        "(loss / accum_steps).backward()", "loss.backward()",
        ("tests/train/test_step.py::test_gradients_are_all_reduced_once_per_optimizer_step_under_accumulation",)),
    Bug("lr schedule: the plan ends at 0, not min_lr", "src/mimkit/train/schedule.py",
        "lr_schedule(lr, optim_cfg.min_lr, total_steps, warmup)", "lr_schedule(lr, 0.0, total_steps, warmup)",
        ("tests/train/test_schedule.py",)),
    Bug("lr schedule: the decay stops a step short of its final value", "src/mimkit/train/schedule.py",
        "span = max(decay_steps - 1, 1)", "span = max(decay_steps, 1)", ("tests/train/test_schedule.py",)),
    Bug("lr schedule: the loop sets the previous step's lr", "src/mimkit/train/step.py",
        "lr = self.schedule.lr[step]", "lr = self.schedule.lr[max(step - 1, 0)]",
        ("tests/train/test_schedule.py",)),
    Bug("data order: every epoch in the first one's order", "src/mimkit/data/loader.py",
        "sample_seed(self.seed, self.epoch, 0)))", "sample_seed(self.seed, 0, 0)))",
        ("tests/train/test_loop.py",)),
    Bug("data order: the loop stays in epoch 0", "src/mimkit/train/loop.py",
        "batches.set_position(epoch, first * schedule.accum_steps)",
        "batches.set_position(0, first * schedule.accum_steps)",
        ("tests/train/test_loop.py::test_the_loop_reads_a_new_order_each_epoch",)),
    Bug("VQ-KD k-means: the tokenizer's quantizer never runs it", "src/mimkit/tokenizers/vqkd.py",
        "NormEMAQuantizer(vocab_size, code_dim, decay, commitment, kmeans_iters, dead_after)",
        "NormEMAQuantizer(vocab_size, code_dim, decay, commitment, 0, dead_after)",
        VQKD_KMEANS),
    Bug("VQ-KD k-means: on the raw features, not the l2-normalized ones",
        "src/mimkit/tokenizers/quantizer.py", "self.init_codebook(flat.detach())",
        "self.init_codebook(z.float().reshape(-1, self.code_dim).detach())",
        VQKD_KMEANS),
    Bug("VQ-KD k-means: rerun on every training batch", "src/mimkit/tokenizers/quantizer.py",
        "self.initialized.fill_(True)", "pass", VQKD_KMEANS),
    Bug("VQ-KD k-means: the method drops vqkd.kmeans_iters", "src/mimkit/methods/vqkd.py",
        "kmeans_iters=v.kmeans_iters, ", "", VQKD_KMEANS),
    Bug("own data: the val masks are not checked at start-up", "src/mimkit/eval/seg_sizing.py",
        'val_check = val_source.check_masks(val_indices, desc="checking val masks")',
        "val_check = train.check_masks([], desc='')",
        ("tests/eval/test_segment_own.py::test_a_bad_val_mask_stops_segment_before_training",)),
    Bug("own data: a JPEG mask is read", "src/mimkit/data/segmentation.py",
        'if img.format == "JPEG":', "if False:",
        ("tests/eval/test_segment_own.py::test_a_bad_val_mask_stops_segment_before_training",
         "tests/eval/test_segment_own.py::test_segsource_refuses_a_jpeg_mask_by_content")),
    Bug("own data: pretraining reads a VOC folder's every file", "src/mimkit/data/sources.py",
        "if (layout := find_layout(path)) is not None:",
        "if (layout := find_layout(path)) is not None and False:",
        ("tests/eval/test_segment_own.py::test_pretraining_on_a_voc_folder_reads_its_train_images_only",)),
    Bug("own data: the final evaluation runs before the final save", "src/mimkit/train/loop.py",
        "if interrupted or last or step % options.checkpoint_every == 0:",
        "if interrupted or step % options.checkpoint_every == 0:",
        ("tests/eval/test_segment_own.py::test_final_checkpoint_is_kept_when_the_final_evaluation_fails",)),
    Bug("own data: an evaluation draws from the training's random stream", "src/mimkit/train/loop.py",
        "with torch.random.fork_rng(devices=devices), stop.during():", "with stop.during():",
        ("tests/eval/test_segment_own.py::test_a_run_stopped_during_an_evaluation_resumes_exactly",)),
    Bug("own data: workers outlive a killed trainer", "src/mimkit/data/loader.py",
        "    die_with_parent(trainer)\n", "    pass\n",
        ("tests/data/test_loader.py",)),
    Bug("own data: forked workers keep the run locked", "src/mimkit/runs.py",
        "        _HELD_LOCKS.add(fd)\n", "        pass\n",
        ("tests/test_runs.py",)),
    Bug("CAE: the alignment targets encode the visible patches", "src/mimkit/models/cae.py",
        "self.forward_encoder(imgs, ~mask.flatten(1))", "self.forward_encoder(imgs, mask.flatten(1))",
        ("tests/models/test_cae.py",)),
    Bug("CAE: the alignment targets carry gradients", "src/mimkit/models/cae.py",
        "        with torch.no_grad():\n            return self.to_latent(",
        "        if True:\n            return self.to_latent(", ("tests/models/test_cae.py",)),
    Bug("CAE: the regressor's keys leave the queries out", "src/mimkit/models/cae.py",
        "context=torch.cat([visible, x], dim=1), pos=pos_masked, context_pos=context_pos)",
        "context=visible, pos=pos_masked, context_pos=pos_visible)", ("tests/models/test_cae.py",)),
    Bug("CAE: the regressor reads [CLS]", "src/mimkit/models/cae.py",
        "visible = self.to_latent(latent)[:, 1:]", "visible = self.to_latent(latent)[:, :-1]",
        ("tests/models/test_cae.py",)),
    Bug("CAE: the position table in MAE's layout", "src/mimkit/models/cae.py",
        "torch.cat([table[..., half:], table[..., :half]], dim=-1)",
        "torch.cat([table[..., :half], table[..., half:]], dim=-1)", ("tests/models/test_cae.py",)),
    Bug("CAE: the run's alignment weight dropped", "src/mimkit/methods/cae.py",
        "ids, weight))", "ids))",
        ("tests/methods/test_cae.py::test_the_runs_alignment_weight_reaches_the_loss",)),
    Bug("CAE v2: the targets not L2-normalized", "src/mimkit/models/cae.py",
        "return F.normalize(class_visible_masked(teacher_tokens.float(), mask.flatten(1)), dim=-1)",
        "return class_visible_masked(teacher_tokens.float(), mask.flatten(1))",
        ("tests/models/test_cae.py",)),
    Bug("CAE v2: the targets in image order, not [CLS], visible, masked", "src/mimkit/models/cae.py",
        "F.normalize(class_visible_masked(teacher_tokens.float(), mask.flatten(1)), dim=-1)",
        "F.normalize(teacher_tokens.float(), dim=-1)", ("tests/models/test_cae.py",)),
    Bug("CAE v2: the loss at the masked patches only", "src/mimkit/models/cae.py",
        "return (1 - cosine).mean(), metrics", "return (1 - cosine[:, num_visible:]).mean(), metrics",
        ("tests/models/test_cae.py",)),
    Bug("CAE v2: the regressor keeps its final norm", "src/mimkit/models/cae.py",
        "        self.regressor_norm = nn.Identity()", "        pass", ("tests/models/test_cae.py",)),
    Bug("CAE v2: the head's LayerNorm left out", "src/mimkit/models/cae.py",
        "F.normalize(self.lm_head(self.decoder_norm(x)).float()", "F.normalize(self.lm_head(x).float()",
        ("tests/models/test_cae.py",)),
    Bug("CAE v2: the picture's cosine in the model's token order", "src/mimkit/methods/cae.py",
        "in_image_order(F.cosine_similarity(pred, target, dim=-1), flat)",
        "F.cosine_similarity(pred, target, dim=-1)[:, 1:]",
        ("tests/methods/test_cae.py::test_the_caev2_pictures_cosine_is_each_patchs_prediction_against_its_"
         "normalized_target",)),
    Bug("CAE v2: --teacher drops --tokenizer", "src/mimkit/cli.py",
        'flags[args.method] = {**flags.get(args.method, {}), "teacher": args.teacher}',
        'flags[args.method] = {"teacher": args.teacher}',
        ("tests/methods/test_cae.py::test_bad_caev2_settings_are_one_line_errors",)),
    Bug("teachers: CLIP's [CLS] feature without its final norm and projection",
        "src/mimkit/tokenizers/teachers.py",
        "tokens = self.projection(self.vision_model.post_layernorm(tokens))\n        return tokens[:, 0],",
        "cls = tokens[:, 0]\n        tokens = self.projection(self.vision_model.post_layernorm(tokens))\n"
        "        return cls,",
        ("tests/tokenizers/test_teachers.py::test_clip_class_feature_goes_through_the_final_norm_and_projection_"
         "like_the_patches",)),
    Bug("data2vec: pretraining never calls the method's after_step (the teacher stays put)",
        "src/mimkit/pretrain.py",
        "after_step=partial(method.after_step, config, model) if method.after_step else None",
        "after_step=None",
        ("tests/methods/test_data2vec.py::test_teacher_moves_once_per_optimizer_step_at_that_steps_decay",)),
    Bug("data2vec: the decay of the step after", "src/mimkit/methods/data2vec.py",
        "teacher_decay(step - 1,", "teacher_decay(step,",
        ("tests/methods/test_data2vec.py::test_teacher_moves_once_per_optimizer_step_at_that_steps_decay",)),
    Bug("data2vec: the EMA weighs the student by the decay", "src/mimkit/models/data2vec.py",
        "torch._foreach_lerp_(list(self.teacher.parameters()), student, 1.0 - decay)",
        "torch._foreach_lerp_(list(self.teacher.parameters()), student, decay)",
        ("tests/models/test_data2vec.py::test_update_teacher_is_an_ema_of_the_student",)),
    Bug("data2vec: the blocks' outputs are averaged unnormalized", "src/mimkit/models/data2vec.py",
        "sum(normalize_targets(x, self.block_norm) for x in blocks)", "sum(x.float() for x in blocks)",
        ("tests/models/test_data2vec.py::test_targets_average_the_top_k_blocks_each_layer_normalized_then_normalized_again",)),
    Bug("data2vec: the teacher follows train mode (stochastic depth, dropout)",
        "src/mimkit/models/data2vec.py",
        "        self.teacher.eval()\n        return self", "        return self",
        ("tests/models/test_data2vec.py::test_teacher_sees_the_whole_image_in_eval_mode_and_starts_as_the_student",)),
    Bug("data2vec: the student's attention dropout stays on the encoder after pretraining's forward",
        "src/mimkit/models/data2vec.py", "                drop.p = 0.0\n", "                pass\n",
        ("tests/models/test_data2vec.py::test_attention_dropout_is_the_students_in_pretraining_only",)),
    Bug("data2vec import: the authors' EMA model is not read", "src/mimkit/methods/data2vec.py",
        'keymap = with_teacher(OFFICIAL_BEIT, "model_ema.")', "keymap = with_teacher(OFFICIAL_BEIT)",
        ("tests/methods/test_data2vec.py::test_reference_checkpoint_imports_student_teacher_and_arguments",)),
    Bug("crop decode: the box is not turned into the stored frame (EXIF orientation 6)",
        "src/mimkit/data/crop_decode.py", "6: ((last_row - right, last_row - left), (top, bottom)),",
        "6: ((left, right), (top, bottom)),",
        ("tests/data/test_crop_decode.py::test_crop_decode_turns_the_box_for_exif_orientation_not_the_image",)),
    Bug("crop decode: the crop is not turned upright (EXIF orientation)", "src/mimkit/data/crop_decode.py",
        "crop = _upright(pixels, header.orientation)", "crop = pixels",
        ("tests/data/test_crop_decode.py::test_crop_decode_turns_the_box_for_exif_orientation_not_the_image",)),
    Bug("crop decode: a bad file's stand-in draws its box after the bad file's draws",
        "src/mimkit/data/loader.py", "            rng.manual_seed(seed)  # every try",
        "            pass  # every try",
        ("tests/data/test_crop_decode.py",)),
    Bug("crop decode: a box at the image's far edge is cut one pixel short", "src/mimkit/data/crop_decode.py",
        "return rows[0], cols[0], rows[1] - rows[0] + 1, cols[1] - cols[0] + 1",
        "return rows[0], cols[0], rows[1] - rows[0], cols[1] - cols[0]",
        ("tests/data/test_crop_decode.py",)),
    Bug("uint8 until the device: batches reach the step unnormalized", "src/mimkit/data/loader.py",
        "yield self.finish({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})",
        "yield {k: v.to(self.device, non_blocking=True).float() for k, v in batch.items()}",
        ("tests/data/test_crop_decode.py",)),
    Bug("pack --max-side: a rebuilt shard index forgets the max side", "src/mimkit/data/shards.py",
        'packed = {"packed": whole["packed"]} if "packed" in whole else {}', "packed = {}",
        ("tests/data/test_shards.py::test_pack_max_side_stores_larger_images_resized_upright_and_the_index_says_so",)),
    Bug("runner: gradient checkpointing ignored", "src/mimkit/runner.py",
        "        job.checkpointed.set_grad_checkpointing()\n", "        pass\n",
        ("tests/test_runner.py::test_each_kind_checkpoints_gradients_when_asked",)),
    Bug("runner: a run of another kind or encoder resumed", "src/mimkit/runs.py",
        "    if then != kind or values.get", "    if False and values.get",
        ("tests/test_kinds.py::test_a_run_of_another_kind_or_encoder_is_never_resumed",)),
    Bug("run kinds: an old run's kind not recognised", "src/mimkit/runs.py",
        "    old = next((kind for section, kind in OLD_RUN_SECTIONS if section in values), None)",
        "    old = None",
        ("tests/test_kinds.py::test_runs_saved_before_config_said_their_kind_are_recognised",)),
    Bug("checkpoints: an old run's eight-digit names are not read", "src/mimkit/train/checkpoint_files.py",
        'return padded if (self.dir / f"{padded}.safetensors").exists() else f"step-{step}"',
        'return f"step-{step}"',
        ("tests/test_reliability_data.py::test_a_run_saved_with_eight_digit_names_resumes_and_prunes_them",)),
    Bug("rescan: a resumed run with --rescan keeps its stored list", "src/mimkit/data/filelist.py",
        "if stored is not None and not rescan:", "if stored is not None:",
        ("tests/data/test_shards.py::test_a_run_keeps_its_shard_members_and_refuses_fewer",)),
    Bug("fresh set 4: the samples of a batch share one augmentation seed", "src/mimkit/data/loader.py",
        "sample_seed(self.seed, self.epoch, p + 1))", "sample_seed(self.seed, self.epoch, b + 1))",
        ("tests/train/test_loop.py::test_every_sample_draws_its_own_augmentation_seed",)),
    Bug("fresh set 4: a stored file list of another data spec is read", "src/mimkit/data/filelist.py",
        "    if stored is not None and stored.source != spec:\n", "    if False:\n",
        ("tests/data/test_own_folder.py::test_a_stored_list_of_other_data_is_not_read",)),
    Bug("fresh set 4: the feature cache key ignores the weights' values", "src/mimkit/eval/features.py",
        'h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")', 'h.update(b"")',
        ("tests/eval/test_probes.py::test_feature_cache_is_per_weights",)),
    Bug("fresh set 4: the crop's class balance counts ignored pixels", "src/mimkit/data/seg_transforms.py",
        "counts = labels[labels != IGNORE_INDEX].bincount()", "counts = labels.flatten().bincount()",
        ("tests/data/test_segmentation.py::test_the_crop_balance_leaves_ignored_pixels_out",)),
    Bug("fresh set 4: the timm export's mean and std swapped", "src/mimkit/interop/export.py",
        '"mean": data.mean,\n                      "std": data.std,',
        '"mean": data.std,\n                      "std": data.mean,',
        ("tests/interop/test_mae.py::test_a_timm_folder_brings_its_own_normalization",)),
    Bug("fresh set 4: predict takes --batch-size 0", "src/mimkit/cli.py",
        'check_range("--batch-size", args.batch_size, 1)\n    kind, config = read_run(',
        'check_range("--batch-size", args.batch_size, 0)\n    kind, config = read_run(',
        ("tests/test_reliability_run.py::test_predict_and_evaluate_check_their_batch_size",)),
    Bug("fresh set 4: an Adam beta of 1 is accepted", "src/mimkit/config.py",
        "if not all(0 <= b < 1 for b in self.betas):", "if not all(0 <= b <= 1 for b in self.betas):",
        ("tests/test_reliability_run.py::test_bad_numbers_are_one_line_errors",)),
    Bug("fresh set 5: a folder's change is judged by its oldest directory", "src/mimkit/data/filelist.py",
        "return max(times, default=0)", "return min(times, default=0)",
        ("tests/data/test_own_folder.py::test_a_file_added_to_any_class_folder_is_noticed_on_resume",)),
    Bug("fresh set 4 (fast tier): an evaluation reads a run's newest weights, not its best",
        "src/mimkit/runs.py",
        "return best if best.exists() else latest_weights(run_dir)", "return latest_weights(run_dir)",
        ("tests/test_runs.py::test_the_best_weights_are_the_kept_best_not_the_newest",)),
    Bug("fresh set 5: weights without their state count as a checkpoint",
        "src/mimkit/train/checkpoint_files.py",
        'if m and (self.dir / f"step-{m.group(1)}.pt").exists())', "if m)",
        ("tests/test_reliability_data.py::test_weights_without_their_state_are_no_checkpoint",)),
    Bug("fresh set 5: k-NN's training features are not normalized", "src/mimkit/eval/knn.py",
        "train = F.normalize(train_features.float(), dim=1)", "train = train_features.float()",
        ("tests/eval/test_probes.py::test_knn_compares_directions_not_lengths",)),
    Bug("fresh set 5: the linear probe's lr is not scaled by the batch", "src/mimkit/eval/linprobe.py",
        "lr = base_lr * batch_size / 256", "lr = base_lr",
        ("tests/eval/test_probes.py::test_linear_probe_lr_scales_with_the_batch",)),
    Bug("fresh set 5: every block drops its path at the last block's rate",
        "src/mimkit/models/classifier.py", "rates = torch.linspace(0, drop_path, len(model.blocks)).tolist()",
        "rates = [drop_path] * len(model.blocks)",
        ("tests/eval/test_finetune.py::test_stochastic_depth_grows_linearly_to_the_last_block",)),
    Bug("fresh set 5: the linear probe decays its bias", "src/mimkit/eval/linprobe.py",
        '{"params": biases, "weight_decay": 0.0}', '{"params": biases, "weight_decay": weight_decay}',
        ("tests/eval/test_probes.py::test_linear_probe_decays_the_weights_only",)),
    Bug("teacher: pretrain's --teacher ignores Method.teacher", "src/mimkit/cli.py",
        'takers = ", ".join(name for name, m in methods.items() if m.teacher)', 'takers = ""',
        ("tests/test_registry.py::test_a_method_that_takes_a_teacher_gets_the_flag_from_its_record",)),
    Bug("maskdistill: the teacher's features not layer-normalized", "src/mimkit/models/maskdistill.py",
        "return self.target_norm(teacher_features.float())", "return teacher_features.float()",
        ("tests/models/test_maskdistill.py::test_the_targets_are_layer_normalized_without_affine",)),
    Bug("maskdistill: the cosine loss is 1 - cos", "src/mimkit/models/maskdistill.py",
        "return 2 - 2 * F.cosine_similarity(pred, target, dim=-1)",
        "return 1 - F.cosine_similarity(pred, target, dim=-1)",
        ("tests/models/test_maskdistill.py::test_cosine_distance_is_the_squared_distance_of_unit_vectors",)),
    Bug("maskdistill: maskdistill.smooth_l1_beta ignored", "src/mimkit/models/maskdistill.py",
        "partial(smooth_l1_distance, beta=smooth_l1_beta)", "partial(smooth_l1_distance, beta=1.0)",
        ("tests/models/test_maskdistill.py::test_the_loss_is_the_distance_of_the_head_to_the_normalized_target",)),
    Bug("maskdistill: the picture's cosine against the raw teacher features",
        "src/mimkit/methods/maskdistill.py",
        "target = model.forward_target(teacher_of(config)(shown))", "target = teacher_of(config)(shown)",
        ("tests/methods/test_maskdistill.py"
         "::test_the_pictures_cosine_is_the_prediction_against_the_normalized_target",)),
    Bug("runs: a run refused at start-up leaves its lock and folder", "src/mimkit/runs.py",
        "if [p.name for p in run_dir.iterdir()] == [LOCK]:", "if False:",
        ("tests/test_runs.py::test_a_run_refused_before_writing_anything_leaves_no_folder",)),
    # fresh set 6 (2026-12-06): each survivor of the sixth fresh set, and the test written against it
    Bug("fresh set 6: a min_block equal to the masked count is refused", "src/mimkit/masking.py",
        "if min_block is not None and min_block > num_masked:",
        "if min_block is not None and min_block >= num_masked:",
        ("tests/test_masking.py::test_checked_block_count_takes_a_min_block_as_large_as_the_masked_count",)),
    Bug("fresh set 6: the start-up check of the blocks draws from the global RNG", "src/mimkit/masking.py",
        "block_mask(grid, grid, num_masked, min_block, generator=torch.Generator())",
        "block_mask(grid, grid, num_masked, min_block)",
        ("tests/test_masking.py::test_checked_block_count_leaves_the_global_rng_alone",)),
    Bug("fresh set 6: pack --max-side saves at Pillow's default quality", "src/mimkit/data/shards.py",
        'img.save(buf, "JPEG", quality=quality)', 'img.save(buf, "JPEG")',
        ("tests/data/test_shards.py::test_pack_max_side_encodes_at_the_quality_asked",)),
    Bug("fresh set 6: CAE's regressor values get the positions too", "src/mimkit/models/cae.py",
        "attn = self.cross_attn(query, key, self.norm1_v(context))",
        "attn = self.cross_attn(query, key, self.norm1_v(context + context_pos))",
        ("tests/models/test_cae.py::test_the_positions_enter_the_regressors_queries_and_keys_not_its_values",)),
    Bug("fresh set 6: data2vec.loss_beta does not reach the model", "src/mimkit/methods/data2vec.py",
        "target_norm=s.target_norm, loss_beta=s.loss_beta,", "target_norm=s.target_norm,",
        ("tests/methods/test_data2vec.py::test_the_runs_loss_beta_reaches_the_loss",)),
    Bug("fresh set 6: a label smoothing of 1 is accepted", "src/mimkit/eval/augment.py",
        "not 0 <= label_smoothing < 1:", "not 0 <= label_smoothing <= 1:",
        ("tests/eval/test_augment.py::test_mix_refuses_settings_out_of_range",)),
    Bug("fresh set 6 (fast tier): the best of an EMA run judged by the raw weights",
        "src/mimkit/eval/finetune.py",
        'best_metric = "val_ema_top1" if config.ema_decay else "val_top1"', 'best_metric = "val_top1"',
        ("tests/eval/test_ema.py::test_a_run_keeps_the_best_weights_by_the_accuracy_it_reports_last",)),
    Bug("fresh set 6: the Slurm master port is not wrapped into its range", "src/mimkit/train/distributed.py",
        'str(_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % _PORT_SPAN)',
        'str(_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")))',
        ("tests/train/test_scale.py::test_a_large_slurm_job_id_still_gives_a_valid_port",)),
    Bug("fresh set 6 (fast tier): --force-config does not reach the loop's resume check",
        "src/mimkit/runner.py",
        "force_resume=run.force_config,", "force_resume=False,",
        ("tests/test_reliability_run.py::test_force_config_resumes_with_another_global_batch",)),
    Bug("region decode: a crop one or two pixels wide upsampled without smoothing (no minimum width)",
        "src/mimkit/data/_jpeg_region.c", "#define MIN_SMOOTHED_COLUMNS 5", "#define MIN_SMOOTHED_COLUMNS 1",
        ("tests/data/test_jpeg_region.py::"
         "test_a_box_one_or_two_pixels_wide_at_an_image_edge_is_upsampled_as_in_the_whole_image",)),
    Bug("region decode: no column decoded left of the box (its first column upsampled as an edge)",
        "src/mimkit/data/_jpeg_region.c", "first_col = left > 0 ? left - 1 : 0;", "first_col = left;",
        (REGION_PIXELS,)),
    Bug("region decode: no column decoded right of the box (its last column upsampled as an edge)",
        "src/mimkit/data/_jpeg_region.c", "? left + width + 1 : cinfo.output_width;",
        "? left + width : cinfo.output_width;", (REGION_PIXELS,)),
    Bug("region decode: the box cut as if the crop were not widened to iMCU columns (left edge off)",
        "src/mimkit/data/_jpeg_region.c", "row_pointers[r] + (size_t)(left - first_col) * channels",
        "row_pointers[r] + (size_t)(left > 0) * channels", (REGION_PIXELS,)),
    Bug("region decode: one row too many skipped", "src/mimkit/data/_jpeg_region.c",
        "skipped = jpeg_skip_scanlines(&cinfo, top);", "skipped = jpeg_skip_scanlines(&cinfo, top + 1) - 1;",
        (REGION_PIXELS,)),
    Bug("region decode: libjpeg's warnings (corrupt data) let through", "src/mimkit/data/_jpeg_region.c",
        "if (level < 0) /* a warning", "if (level < -1) /* a warning",
        ("tests/data/test_jpeg_region.py::test_a_bad_file_or_box_raises_value_error",)),
    Bug("MCU decode: no MCU taken before a box that starts on an MCU boundary (its edge upsampled alone)",
        "src/mimkit/data/_jpeg_region.c", "*first = start / mcu - (fancy && start % mcu == 0);",
        "*first = start / mcu;",
        ("tests/data/test_jpeg_region.py::test_mcu_indexed_decode_is_the_whole_decode_cut_to_the_box_bit_for_bit",)),
    Bug("MCU decode: the image's narrow last MCU column decoded alone (libjpeg then upsamples it plainly)",
        "src/mimkit/data/_jpeg_region.c", "while (layout->fancy_across && first_col > 0 &&",
        "while (0 && first_col > 0 &&",
        ("tests/data/test_jpeg_region.py::test_mcu_indexed_decode_is_the_whole_decode_cut_to_the_box_bit_for_bit",)),
    Bug("MCU transcode: APPn markers dropped (EXIF orientation lost)", "src/mimkit/data/_jpeg_region.c",
        "        jpeg_write_marker(&target, saved->marker, saved->data, saved->data_length);", "",
        ("tests/data/test_jpeg_region.py::test_transcode_keeps_exif_orientation_and_refuses_a_bad_file",)),
    Bug("region decode: a file without its end marker region decoded (a cut below the box unseen)",
        "src/mimkit/data/crop_decode.py", "if decode_region is not None and data.endswith(_END_OF_IMAGE):",
        "if decode_region is not None:",
        ("tests/data/test_jpeg_region.py::test_crop_decoding_takes_the_region_path_for_a_whole_jpeg_only",)),
    # fresh set 7 (2026-12-06): each survivor of the seventh fresh set, and the test written against it
    Bug("fresh set 7: the kinds listed before the built-in ones are loaded", "src/mimkit/kinds.py",
        "    _load_builtin()\n    return dict(_KINDS)", "    return dict(_KINDS)",
        ("tests/test_kinds.py::test_listing_the_kinds_loads_the_built_in_ones",)),
    Bug("fresh set 7: the lock file keeps the digits of a longer earlier PID", "src/mimkit/runs.py",
        "        os.ftruncate(fd, 0)\n        os.pwrite(", "        os.pwrite(",
        ("tests/test_runs.py::test_the_lock_holds_this_process_pid_alone",)),
    Bug("fresh set 7: a checkpoint file's run is always its folder's parent", "src/mimkit/runs.py",
        'run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent',
        "run_dir = path.parent.parent",
        ("tests/test_runs.py::test_a_weights_file_beside_the_config_belongs_to_that_run",)),
    Bug("fresh set 7: a random encoder ignores its seed", "src/mimkit/runs.py",
        "return Encoder(random_encoder(spec, seed), spec,", "return Encoder(random_encoder(spec), spec,",
        ("tests/test_runs.py::test_a_random_encoder_follows_its_seed",)),
    Bug("fresh set 7: a resumed epoch's length counts the batches already done", "src/mimkit/data/loader.py",
        "return self.batches_per_epoch - self.start", "return self.batches_per_epoch",
        ("tests/train/test_loop.py::test_a_resumed_epoch_counts_only_the_batches_left",)),
    Bug("fresh set 7: a worker's error reported by the first message, not its own",
        "src/mimkit/data/loader.py",
        "raise MimkitError(found[-1]) from None", "raise MimkitError(found[0]) from None",
        ("tests/test_reliability_data.py::test_a_workers_error_ends_the_run_with_its_own_last_line",)),
    Bug("fresh set 7: LARS's trust ratio applied to biases and norms", "src/mimkit/eval/lars.py",
        "if p.ndim > 1:", "if p.ndim >= 1:",
        ("tests/eval/test_probes.py::test_lars_steps_a_bias_by_plain_sgd_and_scales_a_matrix_by_its_trust_ratio",)),
    Bug("fresh set 7: the timm export's input_size written channels last", "src/mimkit/interop/export.py",
        '"input_size": [data.channels, data.img_size, data.img_size]',
        '"input_size": [data.img_size, data.img_size, data.channels]',
        ("tests/interop/test_mae.py::test_the_timm_exports_input_size_is_channels_first",)),
    Bug("fresh set 7: --set splits key=value at the last '='", "src/mimkit/config.py",
        'key, sep, raw = pair.partition("=")', 'key, sep, raw = pair.rpartition("=")',
        ("tests/test_config.py::test_an_override_value_may_hold_an_equals_sign",)),
    Bug("fresh set 7: the held-out part in class order, not the source's", "src/mimkit/data/splits.py",
        "for indices in (train, sorted(val)):", "for indices in (train, val):",
        ("tests/data/test_sources.py::test_both_parts_keep_the_sources_order",)),
    Bug("fresh set 7: k-NN's queries after the first chunk sliced from its start", "src/mimkit/eval/knn.py",
        "query = F.normalize(query_features[start:start + chunk]",
        "query = F.normalize(query_features[start:chunk]",
        ("tests/eval/test_probes.py::test_knn_scores_the_same_in_chunks_of_queries",)),
    # the sweep (2026-12-06): every validated setting at its edges, every setting traced to its effect
    Bug("sweep: BEiT's crop scale is not checked", "src/mimkit/methods/beit.py",
        "        check_crop_scale(self.SECTION, self.crop_scale)\n", "",
        ("tests/test_setting_edges.py::test_settings_checked_together_are_taken_at_their_limits_and_refused_just_past",)),
    Bug("sweep: a layer decay just above 1 is accepted", "src/mimkit/eval/config.py",
        "if not 0 < self.layer_decay <= 1:", "if not 0 < self.layer_decay <= 1.0001:",
        ("tests/test_setting_edges.py::test_each_config_setting_is_taken_at_its_limit_and_refused_just_past_it",)),
    Bug("sweep: a VQ-KD codebook decay of 1 is accepted", "src/mimkit/tokenizers/quantizer.py",
        "if not 0.0 <= decay < 1.0:", "if not 0.0 <= decay <= 1.0:",
        ("tests/test_setting_edges.py::test_each_check_in_the_code_takes_its_limit_and_refuses_just_past_it",)),
    Bug("sweep: data pack takes --quality 101", "src/mimkit/cli.py",
        'check_range("--quality", args.quality, 1, 100)', 'check_range("--quality", args.quality, 1, 101)',
        ("tests/test_setting_edges.py::test_each_flag_takes_its_limit_and_refuses_just_past_it",)),
    Bug("sweep: k-NN's --temperature does not reach the vote", "src/mimkit/eval/knn.py",
        "part.num_classes, k, c.temperature,", "part.num_classes, k, 0.07,",
        ("tests/eval/test_probe_settings.py::test_a_non_default_flag_reaches_the_probe",)),
    Bug("sweep: the linear probe's --optimizer does not reach its training", "src/mimkit/eval/linprobe.py",
        "optimizer=c.optimizer, ", "",
        ("tests/eval/test_probe_settings.py::test_a_non_default_flag_reaches_the_probe",)),
    Bug("uint8 hand-over: a crop decode's channel-last image handed over as it is",
        "src/mimkit/data/transforms.py", "self.flip(resized.contiguous())", "self.flip(resized)",
        ("tests/data/test_transforms.py",)),
    Bug("sweep: the linear probe's --weight-decay does not reach its training", "src/mimkit/cli.py",
        "optimizer=args.optimizer, weight_decay=args.weight_decay)", "optimizer=args.optimizer)",
        (f"{PROBE_FLAG_REACHES}[linprobe --weight-decay]",)),
    Bug("sweep (auto): a block as tall as the grid is never placed", "src/mimkit/masking.py",
        "if not (1 <= h <= grid_h and", "if not (1 <= h < grid_h and",
        ("tests/test_masking.py::test_a_block_may_span_the_whole_grid_side",)),
    Bug("sweep (auto): a block never placed in the grid's last row", "src/mimkit/masking.py",
        "int(u_top * (grid_h - h + 1))", "int(u_top * (grid_h - h - 1))",
        ("tests/test_masking.py::test_blocks_reach_every_edge_of_the_grid",)),
    Bug("sweep: CAE's align_weight does not reach the loss", "src/mimkit/methods/cae.py",
        "weight = config.settings.align_weight", "weight = 2.0",
        ("tests/methods/test_settings_reach.py::test_a_non_default_setting_changes_what_a_training_step_gives",)),
    Bug("sweep: VQ-KD's commitment does not reach the quantizer", "src/mimkit/methods/vqkd.py",
        "commitment=v.commitment, ", "",
        ("tests/methods/test_settings_reach.py::test_a_non_default_setting_changes_what_a_training_step_gives",)),
    Bug("sweep: MaskFeat's hog_window does not reach the targets", "src/mimkit/methods/maskfeat.py",
        "hog_window=s.hog_window,", "",
        ("tests/methods/test_settings_reach.py::test_a_non_default_setting_changes_what_a_training_step_gives",)),
    Bug("sweep: MaskDistill's smooth_l1_beta does not reach the loss", "src/mimkit/methods/maskdistill.py",
        "smooth_l1_beta=s.smooth_l1_beta,", "",
        ("tests/methods/test_settings_reach.py::test_a_non_default_setting_changes_what_a_training_step_gives",)),
    Bug("sweep: fine-tuning's mixup_prob does not reach the mixing", "src/mimkit/eval/finetune.py",
        "aug.mixup_switch_prob,\n                     aug.mixup_prob)", "aug.mixup_switch_prob)",
        ("tests/test_job_settings.py::test_a_non_default_setting_changes_the_job",)),
    Bug("sweep: fine-tuning's erasing mode does not reach the view", "src/mimkit/eval/finetune.py",
        "aug.reprob,\n                        aug.remode)", "aug.reprob)",
        ("tests/test_job_settings.py::test_a_non_default_setting_changes_the_job",)),
    Bug("sweep: segmentation's flipped evaluation is never asked for", "src/mimkit/eval/segment.py",
        "seg.eval_mode, seg.eval_stride, seg.eval_flip,", "seg.eval_mode, seg.eval_stride, False,",
        ("tests/test_job_settings.py::test_a_non_default_setting_changes_the_job",)),
    Bug("sweep: segmentation's aux_weight does not reach the loss", "src/mimkit/eval/segment.py",
        'batch["mask"], seg.aux_weight)', 'batch["mask"], 0.4)',
        ("tests/test_job_settings.py::test_a_non_default_setting_changes_the_job",)),
    # mutation sweep, third pass (sweepcore, 2026-12-06): `auto` survivors of runs.py and runner.py
    Bug("sweepcore: the run lock is never taken", "src/mimkit/runs.py",
        "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", "            pass\n",
        ("tests/test_runs.py::test_a_held_run_names_its_holder_and_empties_the_lock_after",)),
    Bug("sweepcore: a forked child keeps its copy of the run lock open", "src/mimkit/runs.py",
        "        _HELD_LOCKS.add(fd)\n", "",
        ("tests/test_runs.py::test_a_forked_child_does_not_keep_the_run_locked",)),
    Bug("sweepcore: a pretraining run's encoder is evaluated without its weights", "src/mimkit/runs.py",
        "    load_weights(model, weights)\n    return _encoder_of", "    return _encoder_of",
        ("tests/test_runs.py::test_a_trained_run_loads_as_its_kind_loads_it_with_its_newest_weights",)),
    Bug("sweepcore: an untrained run's configuration is compared instead of saved", "src/mimkit/runs.py",
        "if not step or not path.is_file():", "if not step and not path.is_file():",
        ("tests/test_runs.py::test_a_saved_configuration_is_headed_by_its_kind_reads_back_and_is_kept",)),
    Bug("sweepcore: settings an older config.yaml lacks are taken for changes", "src/mimkit/runs.py",
        "    values = to_dict(from_dict(kind, values))\n", "",
        ("tests/test_runs.py::test_settings_an_older_config_yaml_lacks_are_compared_as_their_defaults",)),
    Bug("sweepcore: every process of a distributed job takes the run lock", "src/mimkit/runner.py",
        "hold_run_dir(run_dir, enabled=world.is_main)", "hold_run_dir(run_dir)",
        ("tests/test_runner.py::test_only_the_main_process_holds_the_run_and_writes_its_records",)),
    Bug("sweepcore: the loop never gets data.num_workers", "src/mimkit/runner.py",
        "num_workers=job.workers, ", "",
        ("tests/test_runner.py::test_the_loop_gets_the_runs_upkeep_records_and_evaluation",)),
    # the third mutation sweep (sweepeval, 2026-12-06): survivors of `auto` on the evaluation modules
    Bug("sweep eval: k-NN's accuracy leaves out the first query", "src/mimkit/eval/knn.py",
        "bar = tqdm(range(0, len(query_features), chunk)", "bar = tqdm(range(1, len(query_features), chunk)",
        ("tests/eval/test_probes.py::test_knn_accuracy_counts_every_query_of_every_chunk_at_top1_and_top5",)),
    Bug("sweep eval: k-NN's top-1 counts a hit among the two best classes", "src/mimkit/eval/knn.py",
        "query_labels[start:start + chunk], (1, 5))", "query_labels[start:start + chunk], (2, 5))",
        ("tests/eval/test_probes.py::test_knn_accuracy_counts_every_query_of_every_chunk_at_top1_and_top5",)),
    Bug("sweep eval: a k-NN run's record at step 1", "src/mimkit/eval/knn.py",
        "log.write(block or 0, **final)", "log.write(block or 1, **final)",
        ("tests/eval/test_probes.py::test_a_probe_run_saves_its_kind_its_final_record_and_its_wall_time",)),
    Bug("sweep eval: a probe run does not read named data from its root", "src/mimkit/eval/knn.py",
        "c.pool, root=c.root, label_fraction", "c.pool, label_fraction",
        ("tests/eval/test_probes.py::test_a_probe_run_saves_its_kind_its_final_record_and_its_wall_time",)),
    Bug("sweep eval: linprobe's --seed does not reach the label subset", "src/mimkit/eval/linprobe.py",
        "val_fraction=c.val_fraction, seed=c.seed, cache_dir", "val_fraction=c.val_fraction, cache_dir",
        ("tests/eval/test_subsets.py::test_probe_seed_flag_picks_the_subset",)),
    Bug("sweep eval: the feature cache fails when no image is asked for", "src/mimkit/eval/features.py",
        "torch.as_tensor(indices, dtype=torch.long)", "torch.as_tensor(indices)",
        ("tests/eval/test_probes.py::test_feature_cache_extracts_each_image_once",)),
    Bug("sweep eval: the probes' --num-workers stops at probe_data", "src/mimkit/eval/features.py",
        "batch_size=batch_size, num_workers=num_workers)", "batch_size=batch_size)",
        ("tests/eval/test_probes.py::test_probe_data_extracts_with_the_workers_asked_for",)),
    Bug("sweep eval: the linear probe's SGD without momentum", "src/mimkit/eval/linprobe.py",
        "torch.optim.SGD(groups, lr=0.0, momentum=0.9)", "torch.optim.SGD(groups, lr=0.0)",
        ("tests/eval/test_probes.py::test_linear_probe_steps_by_sgd_with_momentum_along_its_schedule",)),
    Bug("sweep eval: the linear probe trains in eval mode after an evaluation", "src/mimkit/eval/linprobe.py",
        "            probe.train()\n", "",
        ("tests/eval/test_probes.py::test_an_evaluation_leaves_the_probes_training_alone",)),
    Bug("sweep eval: the linear probe's data order from the global RNG", "src/mimkit/eval/linprobe.py",
        "order = torch.randperm(len(features), generator=g)", "order = torch.randperm(len(features))",
        ("tests/eval/test_probes.py::test_linear_probe_follows_its_seed_alone",)),
    Bug("sweep eval: the feature cache named by the weights' values alone", "src/mimkit/eval/features.py",
        '        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())\n', "",
        ("tests/eval/test_probes.py::test_weights_digest_tells_names_shapes_dtypes_and_values_apart",)),
    Bug("sweep (models): BEiT v2's picture tokenizes the ViT's view, not the tokenizer's",
        "src/mimkit/viz.py",
        "ids = tokenizer.tokenize(tokenizer_images)  # [B, h, w]\n    x, _",
        "ids = tokenizer.tokenize(images)  # [B, h, w]\n    x, _",
        ("tests/test_viz.py::test_beitv2_prediction_panel_puts_the_models_codes_at_hidden_patches_only",)),
    Bug("sweep (models): ignored pixels (255) of a label map drawn black", "src/mimkit/viz.py",
        "torch.full((256 - len(palette), 3), 255,", "torch.full((256 - len(palette), 3), 0,",
        ("tests/test_viz.py::test_colorize_and_overlay_paint_each_label_and_leave_ignored_pixels_white",)),
    Bug("sweep (models): pictures of runs from 128 px not cut with the ViT view's crop", "src/mimkit/viz.py",
        "IMAGENET_CROP_PCT if data.img_size >= CENTER_CROP_MIN_SIZE else 1.0", "1.0",
        ("tests/test_viz.py::test_run_panels_draw_the_picked_images_in_the_vit_views_crop",)),
    Bug("sweep (models): finetune ignores --set", "src/mimkit/cli.py",
        "return from_dict(FinetuneConfig, merge(merge(values, flags), parse_overrides(args.set)))",
        "return from_dict(FinetuneConfig, merge(values, flags))",
        ("tests/test_cli_args.py::test_finetune_passes_its_flags_into_the_configuration",)),
    Bug("sweep (models): linprobe and knn --init random ignore --seed", "src/mimkit/cli.py",
        "load_encoder(config.encoder, config.init, config.seed)", "load_encoder(config.encoder, config.init)",
        ("tests/test_cli_args.py::test_probes_pass_their_flags",)),
    Bug("sweep (models): pretrain --rescan does not reach the run", "src/mimkit/cli.py",
        "rescan=args.rescan, ", "",
        ("tests/test_cli_args.py::test_pretrain_passes_its_flags_into_the_configuration_and_the_run",)),
    Bug("sweep (models): segment drops --label-fraction", "src/mimkit/cli.py",
        'flags["labels"]["fraction"] = args.label_fraction\n    return from_dict(SegmentConfig',
        'pass\n    return from_dict(SegmentConfig',
        ("tests/test_cli_args.py::test_segment_passes_its_flags_into_the_configuration",)),
    Bug("fresh set 8: config: data.mean and data.std of different lengths accepted", "src/mimkit/config.py",
        "self.std is not None and len(self.mean) != len(self.std):", "self.std is not None and False:",
        ("tests/test_reliability_run.py::test_bad_numbers_are_one_line_errors",)),
    Bug("fresh set 8: runs: an evaluation of a checkpoint file reads the run's newest weights instead",
        'src/mimkit/runs.py',
        'weights = weights or latest_weights(run_dir)',
        'weights = latest_weights(run_dir)',
        ('tests/test_reliability_data.py::test_an_evaluation_of_a_checkpoint_file_reads_that_file',)),
    Bug("fresh set 8: runner: AdamW's betas from the configuration ignored (always 0.9, 0.95)",
        'src/mimkit/runner.py',
        'optimizer = build_adamw(job.param_groups, job.betas)',
        'optimizer = build_adamw(job.param_groups)',
        ('tests/test_runner.py::test_the_optimizer_takes_the_configured_betas',)),
    Bug("fresh set 8: checkpoints: a state file without a step is loaded, not skipped",
        "src/mimkit/train/checkpoint_files.py",
        'if not isinstance(state, dict) or "step" not in state:', "if not isinstance(state, dict):",
        ("tests/test_reliability_data.py::test_a_state_without_a_step_is_skipped_for_an_older_checkpoint",)),
    Bug('fresh set 8: sources: the val split of a folder with val/ and test/ reads test/',
        'src/mimkit/data/sources.py',
        'for name in ((split, "test") if split == "val" else (split, "val"))]',
        'for name in (("test", split) if split == "val" else (split, "val"))]',
        ('tests/data/test_sources.py::test_with_val_and_test_each_split_reads_its_own_folder',)),
    Bug('fresh set 8: folders: non-square images of one size get a square image size (their width)',
        'src/mimkit/data/folders.py',
        'return "RGB" if colour else "L", width if not others and width == height else None, note',
        'return "RGB" if colour else "L", width if not others else None, note',
        ('tests/data/test_sources.py::test_a_folder_has_a_native_side_only_when_its_images_share_one_square_size',)),
    Bug('fresh set 8: loader: sample seeds collide across seeds and epochs',
        'src/mimkit/data/loader.py',
        'return (seed * _SEED_STRIDE + epoch) * _SEED_STRIDE + position',
        'return seed * _SEED_STRIDE + epoch * _SEED_STRIDE + position',
        ('tests/train/test_loop.py::test_sample_seeds_never_repeat_across_run_seeds_epochs_and_positions',)),
    Bug('fresh set 8: crop decode: the box on the reduced grid rounded inwards at its far edge',
        'src/mimkit/data/crop_decode.py',
        'bottom, right = math.ceil((top + height) / factor), math.ceil((left + width) / factor)',
        'bottom, right = (top + height) // factor, (left + width) // factor',
        ('tests/data/test_crop_decode.py::test_dct_scaling_applies_where_the_box_is_twice_the_output_and_stays_close',)),
    Bug('fresh set 8: finetune: eval_every counted in steps, not epochs',
        'src/mimkit/eval/finetune.py',
        'Evaluation(evaluate, config.eval_every * steps_per_epoch, keep_best=best_metric)',
        'Evaluation(evaluate, config.eval_every, keep_best=best_metric)',
        ('tests/test_runner.py::test_finetunes_eval_every_counts_epochs',)),
    Bug('fresh set 8: linprobe: the warmup lasts warmup_epochs steps, not epochs',
        'src/mimkit/eval/linprobe.py',
        'epochs * steps_per_epoch, warmup_epochs * steps_per_epoch)',
        'epochs * steps_per_epoch, warmup_epochs)',
        ('tests/eval/test_probes.py::test_linear_probe_warms_up_over_epochs_not_steps',)),
    Bug("fresh set 8: HF export: the head's keys put under the base model's prefix",
        'src/mimkit/interop/hf.py',
        'return {(k if k.startswith(top_level) else prefix + k): v for k, v in state.items()}',
        'return {prefix + k: v for k, v in state.items()}',
        ('tests/interop/test_mae.py::test_mimkit_to_hf_and_back_is_bit_identical',)),
    Bug('fresh set 8: CAE: the decoder gets no positions for the masked patches it predicts',
        'src/mimkit/models/cae.py',
        'x = predicted + self._positions(mask.flatten(1))[1]',
        'x = predicted',
        ('tests/models/test_cae.py::test_the_decoder_reads_where_each_predicted_patch_lies',)),
    Bug('fresh set 8: VQ-KD: after the held-out evaluation the tokenizer trains in eval mode',
        'src/mimkit/methods/vqkd.py',
        '        model.train(was_training)\n        stats = codebook_stats',
        '        stats = codebook_stats',
        ('tests/tokenizers/test_vqkd.py::test_the_held_out_evaluation_leaves_the_tokenizer_in_the_mode_it_found',)),
    Bug("fresh set 8: import: a timm folder's mean and std ignored for timm's defaults",
        "src/mimkit/interop/importer.py",
        'mean=pretrained.get("mean", layout.mean),', "mean=layout.mean,",
        ("tests/interop/test_mae.py::test_a_timm_folder_brings_its_own_normalization",)),
    Bug("probes: the training images read in the data's channels, not the encoder's",
        "src/mimkit/eval/features.py", 'build_source(data, "train", root=root, channels=spec.channels)',
        'build_source(data, "train", root=root)',
        ("tests/eval/test_probes.py::test_probe_data_reads_colour_data_grey_for_a_grey_encoder",)),
    Bug("sweep (lead): the poly decay multiplies by its power (fast tier)", "src/mimkit/train/schedule.py",
        "lambda t: (1 - t) ** power)", "lambda t: (1 - t) * power)", ("tests/train/test_schedule.py",)),
    Bug("sweep (lead): data of exactly one global batch refused", "src/mimkit/train/schedule.py",
        "    if steps == 0:", "    if steps <= 1:", ("tests/train/test_schedule.py",)),
    # sweepevalx
    Bug("sweepevalx: finetune: after an evaluation the classifier trains in eval mode",
        "src/mimkit/eval/finetune.py", "        model.train()\n", "",
        ("tests/eval/test_finetune.py::test_an_evaluation_scores_the_data_val_split_and_leaves_the_model_"
         "training",)),
    Bug("sweepevalx: finetune: the validation images read from test/", "src/mimkit/eval/finetune.py",
        'else read_split(data, "val", data.channels)', 'else read_split(data, "test", data.channels)',
        ("tests/eval/test_finetune.py::test_an_evaluation_scores_the_data_val_split_and_leaves_the_model_"
         "training",)),
    Bug("sweepevalx: finetune: the test number of the best weights is the last weights'",
        "src/mimkit/eval/finetune.py", "load_weights(chosen, run.checkpoints.best_path)", "chosen = model",
        (FINETUNE_RESULTS,)),
    Bug("sweepevalx: finetune: the best weights' test number from the classifier, not its EMA",
        "src/mimkit/eval/finetune.py",
        "picked = chosen.ema.module if config.ema_decay else chosen.classifier", "picked = chosen.classifier",
        (FINETUNE_RESULTS,)),
    Bug("sweepevalx: finetune: the best weights scored on the validation images",
        "src/mimkit/eval/finetune.py",
        "classification_accuracy(picked.to(world.device), test_loader,",
        "classification_accuracy(picked.to(world.device), val_loader,", (FINETUNE_RESULTS,)),
    Bug("sweepevalx: finetune: the encoder from the best weights even when others are asked for",
        "src/mimkit/eval/finetune.py", "weights = weights or best_weights(run_dir)",
        "weights = best_weights(run_dir)",
        ("tests/eval/test_finetune.py::test_a_finetuned_encoder_comes_from_the_weights_asked_for_else_the_"
         "best",)),
    Bug("sweepevalx: finetune: epochs counted over the whole train split, held-out images included",
        "src/mimkit/eval/finetune.py", "plan = plan_run(len(train_set), world.size",
        "plan = plan_run(len(source), world.size", (FINETUNE_RESULTS,)),
    Bug("sweepevalx: finetune: the data read in its own channels, not the encoder's",
        "src/mimkit/eval/finetune.py", "split, root=data.root, channels=channels,", "split, root=data.root,",
        ("tests/eval/test_finetune.py::test_colour_data_reaches_a_grey_encoder_grey_in_every_split",)),
    Bug("sweepevalx: finetune: --skip-bad-images not passed on to the data",
        "src/mimkit/eval/finetune.py",
        "skip_bad_images=data.skip_bad_images, max_bad_images=data.max_bad_images)", ")",
        ("tests/eval/test_finetune.py::test_an_unreadable_training_image_is_skipped_as_the_run_asks",)),
    Bug("sweepevalx: finetune: a random encoder drawn from seed 0 whatever train.seed says",
        "src/mimkit/eval/finetune.py", "config.classifier.init, seed=config.train.seed)",
        "config.classifier.init)",
        ("tests/eval/test_finetune.py::test_named_data_comes_from_its_root_and_a_random_encoder_from_the_seed",)),
    Bug("sweepevalx: segment: after an evaluation the segmenter trains in eval mode (BatchNorm frozen)",
        "src/mimkit/eval/segment.py", "        model.train()\n", "",
        (SEG + "test_a_finished_run_is_scored_again_and_left_training",)),
    Bug("sweepevalx: segment: a finished run resumed writes results without scoring its weights",
        "src/mimkit/eval/segment.py", '    if "scores" not in last:', "    if False:",
        (SEG + "test_a_finished_run_is_scored_again_and_left_training",)),
    Bug("sweepevalx: segment: a run's newest weights loaded instead of its best",
        "src/mimkit/eval/segment.py",
        "load_weights(model, best_weights(run_dir))",
        'load_weights(model, sorted(Path(run_dir, "checkpoints").glob("step-*.safetensors"))[-1])',
        (SEG + "test_a_segmentation_run_loads_its_best_weights_in_eval_mode",)),
    Bug("sweepevalx: evaluate: the masks not checked before scoring", "src/mimkit/eval/seg_evaluate.py",
        "    source.check_masks(range(len(source)))", "    pass",
        (SEG + "test_evaluate_refuses_a_bad_tta_mask_or_folder_and_another_kind",)),
    Bug("sweepevalx: evaluate: --tta ignored for the run's own settings", "src/mimkit/eval/seg_evaluate.py",
        "scales, flip = TTA[tta] if tta else (seg.eval_scales, seg.eval_flip)",
        "scales, flip = seg.eval_scales, seg.eval_flip",
        (SEG + "test_evaluate_scores_a_split_of_the_runs_data_or_another_folder",)),
    Bug("sweepevalx: evaluate: --data ignored for the run's own data", "src/mimkit/eval/seg_evaluate.py",
        "build_seg_source(data or data_cfg.source, split,", "build_seg_source(data_cfg.source, split,",
        (SEG + "test_evaluate_scores_a_split_of_the_runs_data_or_another_folder",)),
    Bug("sweepevalx: visualize: the pictures drawn from the training images", "src/mimkit/eval/segment.py",
        'source = build_seg_source(data.source, "val", root=data.root, num_classes=seg.num_classes,',
        'source = build_seg_source(data.source, "train", root=data.root, num_classes=seg.num_classes,',
        (SEG + "test_visualize_shows_seeded_validation_images_with_their_masks_and_predictions",)),
    Bug("sweepevalx: segmentation scored in bfloat16 on the CPU too", "src/mimkit/eval/seg_metrics.py",
        'enabled=device.type == "cuda"):', "enabled=True):",
        ("tests/eval/test_seg_metrics.py::test_evaluation_scores_at_the_masks_size_in_full_precision_and_"
         "leaves_eval_mode",)),
    Bug("sweepevalx: seg_metrics: whole and slide swapped", "src/mimkit/eval/seg_metrics.py",
        'if mode == "slide"\n', 'if mode == "whole"\n',
        ("tests/eval/test_seg_metrics.py::test_the_mode_decides_whole_image_or_windows",)),
    Bug("sweepevalx: predict: a segmentation folder's train images left out", "src/mimkit/eval/predict.py",
        'for split in ("train", "val")', 'for split in ("val",)',
        (SEG + "test_predict_writes_each_images_label_map_batched_by_size_as_the_run_evaluates",)),
    Bug("sweepevalx: predict: --tta ignored for the run's own settings", "src/mimkit/eval/predict.py",
        "scales, flip = TTA[tta] if tta else (seg.eval_scales, seg.eval_flip)",
        "scales, flip = seg.eval_scales, seg.eval_flip",
        (SEG + "test_predict_writes_each_images_label_map_batched_by_size_as_the_run_evaluates",)),
    Bug("sweepevalx: predict: label maps at the rescaled input's size, not the image's",
        "src/mimkit/eval/predict.py", "size=batch[0][1].shape[1:],", "size=inputs.shape[2:],",
        (SEG + "test_predict_writes_each_images_label_map_batched_by_size_as_the_run_evaluates",)),
    Bug("sweepevalx: segmentation logits upsampled to the masks corner-aligned",
        "src/mimkit/eval/seg_metrics.py",
        'size=masks.shape[1:], mode="bilinear", align_corners=False)',
        'size=masks.shape[1:], mode="bilinear", align_corners=True)',
        ("tests/eval/test_seg_metrics.py::test_evaluation_scores_at_the_masks_size_in_full_precision_and_"
         "leaves_eval_mode",)),
    # sweeptrain
    Bug("sweeptrain: the loop ignores the run seed for the data order", "src/mimkit/train/loop.py",
        "EpochBatches(len(dataset), options.batch_size, options.seed,",
        "EpochBatches(len(dataset), options.batch_size, 0,",
        ("tests/train/test_loop.py::test_the_loop_reads_a_new_order_each_epoch",)),
    Bug("sweeptrain: the loop loads the data in the trainer, whatever num_workers says",
        "src/mimkit/train/loop.py",
        "build_loader(dataset, batches, options.num_workers, world.device)",
        "build_loader(dataset, batches, 0, world.device)",
        ("tests/train/test_loop.py::test_the_loop_trains_in_train_mode_and_loads_in_the_asked_worker_processes",)),
    Bug("sweeptrain: an evaluation's period ignored for the epoch end", "src/mimkit/train/loop.py",
        "evaluation.every or steps_per_epoch,", "steps_per_epoch,",
        ("tests/train/test_loop.py::test_an_evaluation_runs_when_due_is_logged_and_keeps_the_first_best",)),
    Bug("sweeptrain: an evaluation's random draws shift the training's stream", "src/mimkit/train/loop.py",
        "with torch.random.fork_rng(devices=devices), stop.during():", "with stop.during():",
        ("tests/train/test_loop.py::test_an_evaluation_without_a_period_runs_at_each_epoch_end_and_leaves_the_"
         "training_as_it_was",)),
    Bug("sweeptrain: a model handed over in eval mode is trained in eval mode", "src/mimkit/train/loop.py",
        "    model.train()\n    results: dict = {}", "    results: dict = {}",
        ("tests/train/test_loop.py::test_the_loop_trains_in_train_mode_and_loads_in_the_asked_worker_processes",)),
    Bug("sweeptrain: a stop request during an evaluation waits for its end", "src/mimkit/train/loop.py",
        "        if self.immediate:\n            raise _StopNow", "",
        ("tests/train/test_loop.py::test_a_stop_request_during_an_evaluation_ends_it_at_once_and_saves_the_step",)),
    Bug("sweeptrain: a resume does not restore the random streams", "src/mimkit/train/training_state.py",
        '            _restore_rng(state["rng"], self.world)\n', "",
        ("tests/train/test_loop.py::test_resume_mid_epoch_is_bitwise_identical",)),
    Bug("sweeptrain: every process resumes the first process's random stream",
        "src/mimkit/train/training_state.py",
        'torch.set_rng_state(state["cpu"][rank])', 'torch.set_rng_state(state["cpu"][0])',
        ("tests/train/test_checkpoints.py::test_each_process_resumes_its_own_random_stream",)),
    Bug("sweeptrain: a resume takes the oldest checkpoint that loads", "src/mimkit/train/checkpoint_files.py",
        "for step in reversed(steps):", "for step in steps:", ("tests/train/test_checkpoints.py",)),
    Bug("sweeptrain: the gradients are never clipped", "src/mimkit/train/step.py",
        "_grad_norm(self.model, self.schedule.clip_grad)", "_grad_norm(self.model, None)",
        ("tests/train/test_step.py",)),
    Bug("sweeptrain: the gradient of a step is the sum of its micro-batches'", "src/mimkit/train/step.py",
        "(loss / accum_steps).backward()", "loss.backward()", ("tests/train/test_step.py",)),
    Bug("sweeptrain: a resumed run forgets the records of its own checkpoint step",
        "src/mimkit/train/metrics_log.py",
        'r.get("step", 0) <= step', 'r.get("step", 0) < step', ("tests/train/test_metrics_log.py",)),
    # sweepdata
    Bug("sweepdata: the held-out split ignores skip_bad_images and the other decode settings",
        "src/mimkit/data/sources.py",
        "source = _folder_source(folder, train.info.channels, classes, *folder_options)",
        "source = _folder_source(folder, train.info.channels, classes, False, 100, MAX_IMAGE_PIXELS, None)",
        ("tests/data/test_sources.py::test_a_held_out_split_decodes_as_the_train_split_was_asked_to",)),
    Bug("sweepdata: a segmentation folder's test split reads its train images", "src/mimkit/data/sources.py",
        'files = layout.split("train" if split == "train" else "val")',
        'files = layout.split("val" if split == "val" else "train")',
        ("tests/data/test_sources.py::test_a_segmentation_folder_gives_its_splits_images_without_masks",)),
    Bug("sweepdata: the size hint counts the whole dataset, not its train/", "src/mimkit/data/sources.py",
        'for _, names in walk_images(folder / "train" if (folder / "train").is_dir() else folder):',
        "for _, names in walk_images(folder):",
        ("tests/data/test_sources.py::test_count_images_counts_the_train_split_and_stops_past_the_limit",)),
    Bug("sweepdata: an hf path holding a colon is cut at it", "src/mimkit/data/sources.py",
        'if not path or "/" in dataset_split:', "if not path:",
        ("tests/data/test_hf.py::test_a_colon_in_the_path_or_a_relative_path_is_not_taken_for_a_split",)),
    Bug("sweepdata: channels decided by the first 32 files, not 32 spread over the folder",
        "src/mimkit/data/folders.py",
        "picks = sorted({round(k * (len(self) - 1) / max(samples - 1, 1)) for k in range(samples)})",
        "picks = list(range(min(samples, len(self))))",
        ("tests/data/test_sources.py::test_channels_follow_files_sampled_across_the_whole_folder",)),
    Bug("sweepdata: the loader's workers' base seed drawn from the training's random stream",
        "src/mimkit/data/loader.py", "generator=torch.Generator(),", "",
        ("tests/data/test_loader.py::test_the_loader_leaves_the_training_random_stream_alone",)),
    Bug("sweepdata: crop_view drops its crop scale", "src/mimkit/data/transforms.py",
        "return CropView(img_size, mean, std, scale)", "return CropView(img_size, mean, std)",
        ("tests/data/test_transforms.py::test_the_crop_scale_reaches_the_crop",)),
    Bug("sweepdata: BEiT's tokenizer view normalized with the ViT's statistics",
        "src/mimkit/data/transforms.py",
        "self.tokenizer_normalize = normalize(tokenizer_mean, tokenizer_std)",
        "self.tokenizer_normalize = normalize(mean, std)",
        ("tests/data/test_transforms.py::test_beit_view_normalizes_each_resolution_with_its_own_statistics_and_"
         "jitters_only_when_asked",)),
    Bug("sweepdata: BEiTView crops at BEiT's default scale whatever it is given",
        "src/mimkit/data/transforms.py",
        "RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))",
        "RandomResizedCrop.get_params(image, [0.08, 1.0], list(self.ratio))",
        ("tests/data/test_transforms.py::test_beit_view_crop_scale_and_aspect_ratio",)),
    Bug("sweepdata: a resumed run's source ignores the channels asked for", "src/mimkit/data/filelist.py",
        "stored.classes, channels, skip_bad_images,", "stored.classes, None, skip_bad_images,",
        ("tests/data/test_own_folder.py::test_a_resumed_source_reads_as_the_listed_one",)),
    Bug("sweepdata: a resumed run's source decodes large images at full size", "src/mimkit/data/filelist.py",
        "        max_bad_images, **decode)", "        max_bad_images)",
        ("tests/data/test_own_folder.py::test_a_resumed_source_reads_as_the_listed_one",)),
    Bug("sweepdata: the training loader reads in the main process whatever num_workers says",
        "src/mimkit/data/loader.py",
        "batch_sampler=batches, num_workers=num_workers,", "batch_sampler=batches,",
        ("tests/data/test_loader.py::test_training_workers_run_apart_ignore_stop_signals_and_die_with_the_"
         "trainer",)),
    Bug("sweepdata: a listed folder (predict's images) skips bad images by default",
        "src/mimkit/data/folders.py",
        "None, skip_bad_images: bool = False, max_bad_images",
        "None, skip_bad_images: bool = True, max_bad_images",
        ("tests/data/test_sources.py::test_a_bad_image_stops_a_folder_source_unless_asked_to_skip_it",)),
    Bug("sweepdata: a run's train source looks for a named dataset without data.root",
        "src/mimkit/data/filelist.py",
        'split="train", root=root, channels=channels,', 'split="train", channels=channels,',
        ("tests/data/test_sources.py::test_a_runs_train_source_reads_a_named_dataset_from_root",)),
    # sweepmethods (mutation sweep, fourth pass, 2026-12-06): blind-style bugs of the methods and their models
    Bug("sweepmethods: data2vec: the picture's masked panel blanks the visible patches",
        "src/mimkit/methods/data2vec.py", '"masked": shown * (1 - hidden), "cosine": cosine}',
        '"masked": shown * hidden, "cosine": cosine}', (D2V_PICTURES,)),
    Bug("sweepmethods: data2vec: the picture's student is shown no mask token",
        "src/mimkit/methods/data2vec.py",
        "    x, _ = model.forward_features(shown, mask)\n",
        "    x, _ = model.forward_features(shown, torch.zeros_like(mask))\n", (D2V_PICTURES,)),
    Bug("sweepmethods: data2vec: the teacher's decay read one step late", "src/mimkit/methods/data2vec.py",
        "teacher_decay(step - 1,", "teacher_decay(step,",
        ("tests/methods/test_data2vec.py::test_teacher_moves_once_per_optimizer_step_at_that_steps_decay",)),
    Bug("sweepmethods: data2vec: the view never jitters colours", "src/mimkit/methods/data2vec.py",
        "return self.crop(self.jitter(image))", "return self.crop(image)",
        (SETTING_REACHES + "[data2vec.color_jitter]",)),
    Bug("sweepmethods: data2vec: a DDP-saved teacher's 'module.' keys kept",
        "src/mimkit/methods/data2vec.py",
        '{"model_ema." + k: v for k, v in _strip_module(ema).items()}',
        '{"model_ema." + k: v for k, v in ema.items()}',
        ("tests/methods/test_data2vec.py::test_a_reference_checkpoint_saved_under_ddp_imports_alike",)),
    Bug("sweepmethods: data2vec: the model built for three channels whatever the data's",
        "src/mimkit/methods/data2vec.py", "in_chans=config.data.channels, top_k=s.top_k,", "top_k=s.top_k,",
        ("tests/methods/test_settings_reach.py::test_the_model_is_built_for_the_datas_channels_and_size",)),
    Bug("sweepmethods: data2vec: an imported checkpoint's ImageNet normalization dropped",
        "src/mimkit/methods/data2vec.py", "mean=IMAGENET_MEAN,\n", "\n",
        ("tests/methods/test_data2vec.py::test_reference_checkpoint_imports_student_teacher_and_arguments",)),
    Bug("sweepmethods: data2vec: the targets come from the student", "src/mimkit/models/data2vec.py",
        "blocks = self.teacher.forward_intermediates(", "blocks = self.encoder.forward_intermediates(",
        ("tests/models/test_data2vec.py",)),
    Bug("sweepmethods: data2vec: the targets pass the final norm", "src/mimkit/models/data2vec.py",
        'norm=False, output_fmt="NLC"', 'norm=True, output_fmt="NLC"', ("tests/models/test_data2vec.py",)),
    Bug("sweepmethods: data2vec: the teacher follows the student into train mode",
        "src/mimkit/models/data2vec.py",
        "        self.teacher.eval()\n        return self", "        return self",
        ("tests/models/test_data2vec.py",)),
    Bug("sweepmethods: CAE: the picture encodes the hidden patches and predicts the visible ones",
        "src/mimkit/methods/cae.py", "model.forward_encoder(shown, flat), flat), flat)",
        "model.forward_encoder(shown, ~flat), flat), flat)", (CAE_PICTURE,)),
    Bug("sweepmethods: CAE: the alignment targets encode the visible patches", "src/mimkit/models/cae.py",
        "self.forward_encoder(imgs, ~mask.flatten(1))[:, 1:]",
        "self.forward_encoder(imgs, mask.flatten(1))[:, 1:]",
        ("tests/models/test_cae.py",)),
    Bug("sweepmethods: CAE: CAE v2's start-up summary told as CAE's", "src/mimkit/methods/cae.py",
        'if cae.target == "teacher":\n        return (f"', 'if cae.target != "teacher":\n        return (f"',
        ("tests/methods/test_cae.py::test_the_start_up_summary_names_the_alignment_weight_or_the_caev2_teacher",)),
    Bug("sweepmethods: CAE v2: the picture's masked panel not blanked", "src/mimkit/methods/cae.py",
        '"masked": shown * (1 - pixel_mask(mask, p)),', '"masked": shown * (1 + pixel_mask(mask, p)),',
        ("tests/methods/test_cae.py::"
         "test_the_caev2_pictures_cosine_is_each_patchs_prediction_against_its_normalized_target",)),
    Bug("sweepmethods: SimMIM: the picture pastes the prediction into the visible squares",
        "src/mimkit/methods/simmim.py", '"pasted": shown * (1 - hidden) + pred * hidden',
        '"pasted": shown * hidden + pred * (1 - hidden)',
        ("tests/methods/test_simmim.py::"
         "test_the_pictures_hide_the_masked_squares_and_paste_the_prediction_into_them",)),
    Bug("sweepmethods: SimMIM: a .safetensors reference file read as a pickle",
        "src/mimkit/methods/simmim.py",
        'if path.suffix == ".safetensors":', 'if path.suffix == ".safetensor":',
        ("tests/methods/test_simmim.py::test_reference_weights_in_a_safetensors_file_import",)),
    Bug("sweepmethods: SimMIM: the reference layout's encoder names without their 'encoder.' prefix",
        "src/mimkit/methods/simmim.py", 'nest(TIMM_BEIT, theirs="encoder.")', "nest(TIMM_BEIT)",
        ("tests/methods/test_simmim.py::test_reference_checkpoint_imports_from_its_weights_and_config",)),
    Bug("sweepmethods: SimMIM: the exported transformers config asks for absolute positions",
        "src/mimkit/methods/simmim.py", "use_absolute_position_embeddings=False,",
        "use_absolute_position_embeddings=True,",
        ("tests/methods/test_simmim.py::test_exports_load_in_timm_and_transformers",)),
    Bug("sweepmethods: SimMIM: the loss over the visible pixels", "src/mimkit/models/simmim.py",
        "(error * hidden).sum()", "(error * (1 - hidden)).sum()", ("tests/models/test_simmim.py",)),
    Bug("sweepmethods: MaskFeat: the picture's prediction panel takes the model at the visible patches",
        "src/mimkit/methods/maskfeat.py", "torch.where(mask.flatten(1)[..., None], pred.float(), target)",
        "torch.where(mask.flatten(1)[..., None], target, pred.float())",
        ("tests/methods/test_maskfeat.py::"
         "test_the_pictures_draw_the_hog_and_the_prediction_at_the_hidden_patches_only",)),
    Bug("sweepmethods: MaskFeat: hog_window never reaches the model", "src/mimkit/methods/maskfeat.py",
        "hog_window=s.hog_window,", "", (SETTING_REACHES + "[maskfeat.hog_window]",)),
    *[Bug(f"sweepmethods: {name}: gradient checkpointing switched on does nothing",
          f"src/mimkit/models/{name}.py",
          "        self.encoder.set_grad_checkpointing(enable)", "        pass",
          (f"tests/train/test_scale.py::test_grad_checkpointing_gives_the_same_loss_and_gradients[{name}]",))
      for name in ("simmim", "cae", "maskfeat")],
    Bug("sweepmethods: BEiT/CAE: the tokenizer's view normalized as the run's data, not as it was trained",
        "src/mimkit/methods/beit.py", "tokenizer.mean or data.mean,", "data.mean,", (BEIT_TOKENIZER_NORM,)),
    Bug("sweepmethods: BEiT/CAE: the pictures' tokenizer images normalized as the run's data",
        "src/mimkit/methods/beit.py", "found.mean or data.mean, found.std or data.std)",
        "data.mean, data.std)", (BEIT_TOKENIZER_NORM,)),
    Bug("sweepmethods: dVAE: a tokenizer run's view size read as its data's image size",
        "src/mimkit/methods/dvae.py",
        "size, data = config.settings.tokenizer_size or config.data.img_size, config.data",
        "size, data = config.data.img_size, config.data",
        ("tests/methods/test_beit.py::test_a_tokenizer_trained_on_smaller_views_gives_the_run_its_view_size",)),
    Bug("sweepmethods: VQ-KD: the held-out images read from the train split", "src/mimkit/methods/vqkd.py",
        'split="val", root=data.root', 'split="train", root=data.root', (VQKD_HELD_OUT,)),
    Bug("sweepmethods: VQ-KD: every image of the split held out, not vqkd.eval_images",
        "src/mimkit/methods/vqkd.py", "picks = shuffled[:config.settings.eval_images]", "picks = shuffled",
        (VQKD_HELD_OUT,)),
    Bug("sweepmethods: VQ-KD: the held-out subset drawn from the run's random stream",
        "src/mimkit/methods/vqkd.py", "randperm(len(source), generator=torch.Generator().manual_seed(0))",
        "randperm(len(source))", (VQKD_HELD_OUT,)),
    Bug("sweepmethods: dVAE: the pictures drawn at the data's size, not at the tokenizer's view size",
        "src/mimkit/methods/dvae.py", "size = config.settings.tokenizer_size or data.img_size",
        "size = data.img_size",
        ("tests/methods/test_beit.py::test_a_tokenizer_trained_on_smaller_views_gives_the_run_its_view_size",)),
    Bug("sweepmethods: BEiT v2: the tokenizer's view normalized as the run's data, not as the VQ-KD run's",
        "src/mimkit/methods/beitv2.py", "    data = tokenizer_run.data\n", "    data = config.data\n",
        (BEITV2_TOKENIZER_NORM,)),
    Bug("sweepmethods: BEiT v2: the pictures' tokenizer images normalized as the run's data",
        "src/mimkit/methods/beitv2.py", "images(data.img_size, tokenizer_data.mean, tokenizer_data.std)",
        "images(data.img_size, data.mean, data.std)", (BEITV2_TOKENIZER_NORM,)),
    # fresh set 9 (2026-12-06): its five survivors, each now killed by a test written after the set ran
    Bug("fresh set 9: CLI: --epochs keeps a recipe's train.max_steps (the run stops at the recipe's steps)",
        "src/mimkit/cli.py", 'train |= {"epochs": args.epochs, "max_steps": None}',
        'train["epochs"] = args.epochs',
        ("tests/test_cli_args.py::test_epochs_replace_a_recipes_step_count",)),
    Bug("fresh set 9: runs: a trained run resumed with another train.epochs is refused", "src/mimkit/runs.py",
        '"train.epochs", "train.max_steps", "train.checkpoint_every"',
        '"train.max_steps", "train.checkpoint_every"',
        ("tests/test_runs.py::test_a_trained_run_resumes_with_its_length_or_upkeep_changed",)),
    Bug("fresh set 9: scores: a classifier scored in the mode its caller left it in (dropout on in training)",
        "src/mimkit/eval/scores.py", "    model.eval()\n    top1 = top5 = seen = 0\n",
        "    top1 = top5 = seen = 0\n",
        ("tests/eval/test_probes.py::test_classification_accuracy_scores_the_model_as_at_inference",)),
    Bug("fresh set 9: linprobe: --seed reaches the label split but not the probe's initialisation and order",
        "src/mimkit/eval/linprobe.py", "seed=c.seed,\n                                   evaluate=evaluate",
        "evaluate=evaluate",
        ("tests/eval/test_probe_settings.py::test_the_seed_reaches_the_linear_probe_itself",)),
    Bug("fresh set 9: HF export: the image processor resizes bilinearly, not bicubic as mimkit's views",
        "src/mimkit/interop/hf.py", '"resample": 3', '"resample": 2',
        ("tests/interop/test_mae.py::test_mimkit_to_hf_and_back_is_bit_identical",)),
]

def run_tests(src: Path, tests: list[str], timeout: float) -> str:
    """``killed`` / ``survived`` / ``timeout`` of ``tests`` against the package in ``src``."""
    env = os.environ | {"PYTHONPATH": str(src), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if done.returncode == 0 else "killed"


def build_extension(copy: Path, path: str) -> None:
    """Compile the C file ``path`` of the copy in place (setup.py), the built module removed first, so a
    planted bug in C is what the tests load (a failed build leaves none: the tests see the fallback)."""
    module = Path(path).with_suffix("")
    for built in (copy / module.parent).glob(f"{module.name}*.so"):
        built.unlink()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, copy)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=copy,
                   capture_output=True, check=True)


def with_mutant(path: str, text: str, tests: list[str], timeout: float) -> str:
    """Run ``tests`` against a copy of ``src/`` in which ``path`` reads ``text``."""
    with tempfile.TemporaryDirectory(prefix="mimkit-mutant-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        (Path(tmp) / path).write_text(text)
        if path.endswith(".c"):
            build_extension(Path(tmp), path)
        return run_tests(src, tests, timeout)


def check_baseline(path: str, tests: list[str], timeout: float) -> None:
    """The tests must pass on an unmutated copy, or every mutant would look killed."""
    outcome = with_mutant(path, (ROOT / path).read_text(), tests, timeout)
    if outcome != "survived":
        sys.exit(f"the tests {' '.join(tests)} do not pass on the unmutated code ({outcome}); fix that first")


def planted(only: str | None, timeout: float) -> int:
    survivors = 0
    bugs = [bug for bug in PLANTED if not only or only.lower() in bug.name.lower()]
    check_baseline(bugs[0].path, sorted({t for bug in bugs for t in bug.tests}), timeout)
    for bug in bugs:
        original = (ROOT / bug.path).read_text()
        if original.count(bug.old) != 1:
            print(f"STALE     {bug.name}: the text to replace occurs {original.count(bug.old)} times")
            survivors += 1
            continue
        outcome = with_mutant(bug.path, original.replace(bug.old, bug.new), list(bug.tests), timeout)
        survivors += outcome != "killed"
        print(f"{outcome:9s} {bug.name}", flush=True)
    return survivors


# (pattern, replacement): each occurrence of each pattern on a line makes one mutant
OPERATORS = [
    (r" \+ ", " - "), (r" - ", " + "), (r" \* ", " / "), (r" / ", " * "), (r" \*\* ", " * "),
    (r" == ", " != "), (r" != ", " == "), (r" < ", " <= "), (r" <= ", " < "), (r" > ", " >= "),
    (r" >= ", " > "), (r"\band\b", "or"), (r"\bor\b", "and"), (r"\bnot ", ""), (r"\bTrue\b", "False"),
    (r"\bFalse\b", "True"), (r"\bmin\(", "max("), (r"\bmax\(", "min("), (r"\bargmax\(", "argmin("),
    (r"(?<![\w.])1\b(?!\.)", "2"), (r"(?<![\w.])0\b(?!\.)", "1"), (r"\bdim=1\b", "dim=0"),
]


def code_lines(text: str):
    """(index, line, code) of every line that holds code: not in a docstring, not a comment, blank or
    import line; ``code`` is the line without its trailing comment."""
    in_docstring = False
    for n, line in enumerate(text.splitlines(keepends=True)):
        stripped = line.strip()
        if stripped.count('"""') % 2 == 1:
            in_docstring = not in_docstring
            continue
        if in_docstring or stripped.startswith(("#", "import ", "from ", '"""')) or not stripped:
            continue
        yield n, line, line.split("  #")[0]


def operator_mutants(lines: list[str]):
    """(index, mutated line) for every operator occurrence of OPERATORS."""
    for n, line, code in code_lines("".join(lines)):
        for pattern, replacement in OPERATORS:
            for match in re.finditer(pattern, code):
                yield n, line[:match.start()] + replacement + line[match.end():]


PLAIN = r"[\w.\[\]\"']+"  # a plain value: a name, attribute, number, string or subscript
# what statement_mutants drops from a line: a keyword argument with a plain value after a comma, a string
# item before another (of a set or list of names), a dict entry with a plain value after the first
DROPPED = [re.compile(rf", \w+={PLAIN}(?=[,)])"), re.compile(r'(?<!: )"[^"\n]*", (?=")'),
           re.compile(rf', "\w+": {PLAIN}(?=[,}}])')]
# a keyword argument with a plain value first on a line that continues a call, dropped (indentation kept)
LEADING_KEYWORD = re.compile(rf"^\s*(\w+={PLAIN}(?:, ?|(?=\))))")
# lines that open or continue a block: deleting them would not parse
BLOCK_LINE = re.compile(r"^(def|class|if|elif|else|for|while|try|except|finally|with|async|@)\b")


def statement_mutants(lines: list[str]):
    """(index, mutated line) deleting each one-line statement (``pass`` in its place), dropping each plain
    keyword argument (also one that starts a continued call's line), each string item followed by another
    and each dict entry after the first: the bugs of a forgotten call, update, argument or name."""
    depth = 0  # open brackets before the line: a line inside a bracket is part of a longer statement
    in_signature = False  # inside a def's brackets, where `name=value` is a default, not an argument
    code_at = {n: code for n, _, code in code_lines("".join(lines))}
    for n, line in enumerate(lines):
        code = code_at.get(n)
        if code is None:
            continue
        opened = depth
        depth = max(0, depth + sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}"))
        stripped = code.strip()
        if opened == 0:
            in_signature = stripped.startswith(("def ", "async def "))
        whole = opened == 0 and depth == 0 and not stripped.endswith(("\\", ":"))
        if whole and not BLOCK_LINE.match(stripped):
            yield n, line[:len(line) - len(line.lstrip())] + "pass\n"
        if in_signature:
            continue
        for pattern in DROPPED:
            for match in pattern.finditer(code):
                yield n, line[:match.start()] + line[match.end():]
        leading = LEADING_KEYWORD.match(code) if opened else None
        if leading:
            yield n, line[:leading.start(1)] + line[leading.end(1):]


def mutants(text: str):
    """(line number, mutated line, mutated text) for every operator occurrence, one-line statement and
    plain keyword argument outside comments, docstrings and import lines (a rough filter: lines inside
    triple quotes are skipped)."""
    lines = text.splitlines(keepends=True)
    for mutate in (operator_mutants, statement_mutants):
        for n, mutated in mutate(lines):
            yield n + 1, mutated.rstrip(), "".join(lines[:n] + [mutated] + lines[n + 1:])


def auto(path: str, tests: list[str], timeout: float) -> int:
    check_baseline(path, tests, timeout)
    text = (ROOT / path).read_text()
    counts: dict[str, int] = {}
    for line_no, line, mutated in mutants(text):
        outcome = with_mutant(path, mutated, tests, timeout)
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome != "killed":
            print(f"{outcome:9s} {path}:{line_no}: {line.strip()}", flush=True)
    total = sum(counts.values())
    print(f"{path}: {total} mutants, " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return counts.get("survived", 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    plant = modes.add_parser("planted", help="the hand-planted bugs of PLANTED")
    plant.add_argument("--only", help="only bugs whose name contains this")
    plant.add_argument("--timeout", type=float, default=300)
    generated = modes.add_parser("auto", help="textual mutants of one module")
    generated.add_argument("module", help="e.g. src/mimkit/train/optim.py")
    generated.add_argument("tests", nargs="+", help="the test files (or node ids) that cover it")
    generated.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    if args.mode == "planted":
        return int(planted(args.only, args.timeout) > 0)
    return int(auto(args.module, args.tests, args.timeout) > 0)


if __name__ == "__main__":
    sys.exit(main())
