"""The streaming path: ``prepare-data convert`` then ``--data.streaming``: the same samples as the folder tree, every
sample once per epoch on each of 2 ranks (gloo), a mid-epoch checkpoint that resumes at the next unseen sample."""

from __future__ import annotations

import json
import os
import pickle

import lightning as L
import pytest
import torch
from imagenet_tiny_tree import write_imagenet_tree
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_methods import ImageClassifier
from lightning_methods.cli import build_cli, main
from lightning_methods.datamodules import ImageNetDataModule
from lightning_methods.imagenet.prepare import main as prepare

from helpers import TinyNet, quiet_trainer, run_ddp

pytest.importorskip("litdata")

SMALL = dict(num_classes=4, image_size=24, eval_resize=28, batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny tree (4 classes x 6 training, x 2 validation images) and its litdata conversion (small chunks, so the
    data set has several chunks to shard)."""
    tmp = tmp_path_factory.mktemp("stream")
    root = write_imagenet_tree(tmp / "tree", classes=4, per_class=6, val_per_class=2)
    main(["prepare-data", "convert", str(root), str(tmp / "conv"), "--num_workers", "1", "--chunk_bytes", "3kb"])
    return root, tmp / "conv"


def _eval_samples(dm) -> dict[int, tuple[int, torch.Tensor]]:
    dm.setup("fit")
    out = {}
    for split in ("train", "test"):
        ds = dm.train_set if split == "train" else dm.test_set
        if dm.streaming:
            ds.set_mode("eval")
            items = [ds[i] for i in range(len(ds))]
        else:
            items = [ds.with_mode("eval")[i] for i in range(len(ds))]
        for item in items:
            out[(split, int(item["index"]))] = (int(item["target"]), item["image"].reshape(3, 24, 24))
    return out


def test_converted_and_folder_data_give_the_same_samples(converted):
    root, conv = converted
    folder = _eval_samples(ImageNetDataModule(str(root), **SMALL))
    stream = _eval_samples(ImageNetDataModule(str(root), streaming=str(conv), **SMALL))
    assert len(folder) == 32 and folder.keys() == stream.keys()
    for key, (target, image) in folder.items():
        assert stream[key][0] == target and torch.equal(stream[key][1], image)


def test_streaming_train_item_is_the_folder_training_sample(converted):
    """``train_set[i]`` (SSAM-F's Fisher pass) gives the decoded, unbatched training sample of the folder path, also
    after the training loader set a bytes mode (decoding on the device)."""
    root, conv = converted
    folder = ImageNetDataModule(str(root), **SMALL)
    folder.setup("fit")
    by_index = {int(folder.train_set[i]["index"]): folder.train_set[i] for i in range(len(folder.train_set))}
    dm = ImageNetDataModule(str(root), streaming=str(conv), decode_on_device=True, **SMALL)
    dm.setup("fit")
    dm.train_dataloader()  # sets the streaming data set to train_bytes
    assert dm.train_set.mode == "train_bytes"
    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        assert "jpeg" not in item and item["image"].shape == (3, 24, 24) and item["target"].ndim == 0
        expected = by_index[int(item["index"])]
        assert int(item["target"]) == int(expected["target"]) and torch.equal(item["image"], expected["image"])


def _train_crops(loader, set_epoch=None) -> list[dict[int, torch.Tensor]]:
    epochs = []
    for epoch in range(2):
        if set_epoch is not None:
            set_epoch(epoch)  # what Lightning's fit loop does for the folder path's sampler
        epochs.append({int(i): img for b in loader for i, img in zip(b["index"], b["image"], strict=True)})
    return epochs


def test_streaming_training_crops_equal_the_folder_path_epoch_by_epoch(converted):
    """Both paths draw a sample's crop and flip from ``(seed, epoch, index)`` with 0-based epochs (litdata counts its
    epochs from 1), so training on the converted data sees exactly the folder path's training images."""
    root, conv = converted
    folder = ImageNetDataModule(str(root), **SMALL)
    folder.setup("fit")
    loader = folder.train_dataloader()
    expected = _train_crops(loader, loader.sampler.set_epoch)
    dm = ImageNetDataModule(str(root), streaming=str(conv), **SMALL)
    dm.setup("fit")
    got = _train_crops(dm.train_dataloader())
    for epoch in range(2):
        assert got[epoch].keys() == expected[epoch].keys() == set(range(24))
        for index, image in expected[epoch].items():
            assert torch.equal(got[epoch][index], image), (epoch, index)
    assert any(not torch.equal(expected[0][i], expected[1][i]) for i in expected[0])  # a new crop each epoch


def test_every_sample_once_per_epoch_in_a_new_order(converted):
    root, conv = converted
    dm = ImageNetDataModule(str(root), streaming=str(conv), **SMALL)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [torch.cat([b["index"] for b in loader]).tolist() for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
    assert epochs[0] != epochs[1]


def test_evaluation_shares_the_samples_evenly_between_ranks():
    """The evaluation data set's assignment (``BalancedNoShuffle``): rank ``r`` gets the ``r``-th contiguous part
    of the stored order, part sizes differing by at most one, split between the rank's workers by litdata's own rule
    (whole batches, the rest to one worker); one rank gets exactly litdata's assignment. Chunks of uneven sizes, one
    of them subsampled (its region of interest is not the whole chunk)."""
    from litdata.streaming.item_loader import Interval
    from litdata.streaming.shuffle import NoShuffle
    from litdata.utilities.env import _DistributedEnv

    from lightning_methods.datamodules.streaming_litdata import BalancedNoShuffle

    class Chunks:  # the part of litdata's Cache that a shuffler reads
        def get_chunk_intervals(self):
            return [Interval(0, 0, 5, 5), Interval(5, 5, 8, 8), Interval(8, 9, 14, 15), Interval(15, 15, 16, 16),
                    Interval(16, 16, 20, 20)]

    stored = [*range(0, 8), *range(9, 14), *range(15, 20)]  # 18 samples
    for world in range(1, 6):
        for workers in (1, 2, 3):
            for batch in (1, 3, 64):
                shuffler = BalancedNoShuffle(Chunks(), 0, False)
                env = _DistributedEnv(world_size=world, global_rank=0, num_nodes=1)
                _chunks, intervals = shuffler.get_chunks_and_intervals_per_workers(env, workers, batch, 1)
                assert len(intervals) == world * workers
                ranks = []
                for rank in range(world):
                    mine = intervals[rank * workers:(rank + 1) * workers]
                    per_worker = [[i for _s, lo, hi, _e in pieces for i in range(lo, hi)] for pieces in mine]
                    assert sum(len(w) % batch != 0 for w in per_worker) <= 1  # whole batches but for one worker
                    ranks.append([i for w in per_worker for i in w])
                    rank_env = _DistributedEnv(world_size=world, global_rank=rank, num_nodes=1)
                    assert shuffler.get_len(rank_env, workers, batch, 1) == len(ranks[-1])
                assert [i for r in ranks for i in r] == stored  # each once, contiguous parts in the stored order
                assert max(map(len, ranks)) - min(map(len, ranks)) <= 1
                if world == 1:
                    assert intervals == NoShuffle(Chunks(), 0, False).get_chunks_and_intervals_per_workers(
                        env, workers, batch, 1)[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_loader_yields_its_length_and_every_sample_once(converted, workers):
    """Batches of 3 over 8 validation images: litdata splits them between the workers in whole batches, so the
    loader yields exactly ``len(loader)`` batches (Lightning's evaluation stops there) holding every image once."""
    root, conv = converted
    dm = ImageNetDataModule(str(root), streaming=str(conv), **dict(SMALL, num_workers=workers, eval_batch_size=3))
    dm.setup("fit")
    loader = dm.val_dataloader()
    batches = [b["index"].tolist() for b in loader]
    assert len(batches) == len(loader) == 3 and sorted(i for b in batches for i in b) == list(range(8))


def test_streaming_data_sets_pickle_for_spawned_workers(converted):
    """DataLoader workers started by ``spawn`` (macOS's default) receive the data set pickled: its class and its
    evaluation shuffler are module-level classes, so it pickles, and the copy reads the same samples."""
    root, conv = converted
    dm = ImageNetDataModule(str(root), streaming=str(conv), **SMALL)
    dm.setup("fit")
    for dataset in (dm.train_set, dm.val_set):
        len(dataset)  # builds the shuffler, as the loader does before it starts workers
        copy = pickle.loads(pickle.dumps(dataset))
        assert type(copy) is type(dataset) and type(copy.shuffler) is type(dataset.shuffler)
        assert torch.equal(copy[0]["image"], dataset[0]["image"]) and int(copy[0]["index"]) == int(dataset[0]["index"])


class Record(L.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[list[int], float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((batch["index"].tolist(), round(float(batch["image"].double().sum()), 3)))


def _fit(dm_kwargs, ckpt_path=None, **trainer_args):
    torch.manual_seed(0)
    record = Record()
    trainer_args.setdefault("max_epochs", 2)
    trainer = quiet_trainer(callbacks=[record, *trainer_args.pop("callbacks", [])], **trainer_args)
    trainer.fit(ImageClassifier(backbone=TinyNet(4), num_classes=4), datamodule=ImageNetDataModule(**dm_kwargs),
                ckpt_path=ckpt_path, weights_only=True)
    return record.seen


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_checkpoint_resumes_at_the_next_unseen_sample(converted, tmp_path, workers):
    root, conv = converted
    kwargs = dict(SMALL, data_dir=str(root), streaming=str(conv), num_workers=workers)
    full = _fit(kwargs)
    assert len(full) == 12  # 2 epochs x 6 batches
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    first = _fit(kwargs, max_steps=2, callbacks=[ckpt], enable_checkpointing=True)
    path = tmp_path / "epoch=0-step=2.ckpt"
    assert path.is_file() and first == full[:2]
    rest = _fit(kwargs, ckpt_path=str(path))
    assert first + rest == full  # same batches, same augmented images, and the second epoch starts afresh


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "folder"])
def test_end_of_epoch_checkpoint_resumes_with_the_next_epoch(converted, tmp_path, stream):
    """`--ckpt_path last` after a finished epoch (the usual resume: last.ckpt is written at each epoch's end), with a
    DataLoader worker: the resumed fit takes the batches of the uninterrupted run's next epoch. Lightning gives such
    a resume no loader state and creates the loader's iterator (whose worker prefetches at once) before it calls
    set_epoch, so the loader has to start in the restored epoch by itself; it used to replay epoch 0's order and
    crops."""
    root, conv = converted
    kwargs = dict(SMALL, data_dir=str(root), streaming=str(conv) if stream else None, num_workers=1)
    full = _fit(kwargs)
    assert len(full) == 12  # 2 epochs x 6 batches
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = _fit(kwargs, max_epochs=1, callbacks=[ckpt], enable_checkpointing=True)
    assert first == full[:6]
    rest = _fit(kwargs, ckpt_path=str(tmp_path / "last.ckpt"))
    assert rest == full[6:] and rest != first  # the second epoch: its own order and crops, not epoch 0's again


def _rank_job(rank: int, world_size: int, kwargs: dict, ckpt_dir: str) -> dict:
    """One rank of three 2-process DDP fits in turn (2 epochs; 2 steps and a checkpoint; the resumed rest), then its
    validation loader's samples."""
    ddp = {"strategy": "ddp", "devices": world_size}
    full = _fit(kwargs, **ddp)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)
    first = _fit(kwargs, max_steps=2, enable_checkpointing=True, callbacks=[ckpt], **ddp)
    torch.distributed.barrier()  # the checkpoint is written (by rank 0) before any rank reads it
    rest = _fit(kwargs, ckpt_path=os.path.join(ckpt_dir, "epoch=0-step=2.ckpt"), **ddp)
    # the usual resume, last.ckpt of a finished epoch, with a DataLoader worker on each rank (it prefetches before
    # Lightning sets the epoch)
    worker = dict(kwargs, num_workers=1)
    worker_full = _fit(worker, **ddp)
    _fit(worker, max_epochs=1, enable_checkpointing=True, **ddp,
         callbacks=[ModelCheckpoint(dirpath=os.path.join(ckpt_dir, "epochs"), save_last=True)])
    torch.distributed.barrier()
    next_epoch = _fit(worker, ckpt_path=os.path.join(ckpt_dir, "epochs", "last.ckpt"), **ddp)
    dm = ImageNetDataModule(**dict(kwargs, eval_batch_size=64))
    dm.setup("fit")
    loader = dm.val_dataloader()
    val = [b["index"].tolist() for b in loader]
    return {"full": full, "first": first, "rest": rest, "val": val, "val_len": len(loader),
            "worker_full": worker_full, "next_epoch": next_epoch}


def test_two_ranks_share_each_epoch_resume_mid_epoch_and_split_validation_evenly(converted, tmp_path):
    """2 ranks (gloo): every training sample once per epoch on one rank, reshuffled each epoch; the checkpoint of
    rank 0 (litdata's loader state counts samples per rank, alike on every rank) resumes both ranks at their next
    unseen sample (each sees the batches of the uninterrupted run); with a worker per rank, the end-of-epoch
    checkpoint resumes each rank with its share of the next epoch; 8 validation images in batches of 64 are split
    4 / 4 (litdata's own rule gave the last rank all 8 and the other an empty loader, which stops Lightning's
    validation)."""
    root, conv = converted
    ranks = run_ddp(_rank_job, 2, (dict(SMALL, data_dir=str(root), streaming=str(conv)), str(tmp_path)))
    for rank, job in enumerate(ranks):
        assert len(job["full"]) == 6  # 2 epochs x 3 batches of 4 on each rank: nothing to drop
        assert job["first"] == job["full"][:2] and job["first"] + job["rest"] == job["full"], rank
        assert job["val_len"] == len(job["val"]) == 1 and len(job["val"][0]) == 4
        assert len(job["worker_full"]) == 6 and job["next_epoch"] == job["worker_full"][3:], rank
        assert job["next_epoch"] != job["worker_full"][:3]  # the second epoch's order and crops, not the first's
    epochs = [[[i for batch, _ in job["full"][3 * e:3 * e + 3] for i in batch] for e in range(2)] for job in ranks]
    for epoch in range(2):
        assert sorted(epochs[0][epoch] + epochs[1][epoch]) == list(range(24))
    assert epochs[0][0] != epochs[0][1]
    assert sorted(ranks[0]["val"][0] + ranks[1]["val"][0]) == list(range(8))


def test_streaming_needs_matching_classes_and_no_holdout(converted):
    root, conv = converted
    with pytest.raises(ValueError, match="holds 4 classes .* num_classes=5"):
        ImageNetDataModule(str(root), streaming=str(conv), **dict(SMALL, num_classes=5)).setup("fit")
    with pytest.raises(ValueError, match="val_split"):
        ImageNetDataModule(str(root), streaming=str(conv), val_split=0.1, **SMALL).setup("fit")
    assert os.path.isfile(conv / "train" / "index.json")


def test_demo_photos_prepare_convert_and_fit_through_streaming(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = prepare(["demo", "photos", "--per_class", "6", "--val_per_class", "2", "--size", "96"])
    assert (summary["classes"], summary["train"], summary["val"]) == (4, 24, 8)
    assert sorted(p.name for p in (tmp_path / "photos" / "train").iterdir()) == [
        "china_bottom", "china_top", "flower_bottom", "flower_top"]
    main(["prepare-data", "convert", "photos", "stream", "--num_workers", "1"])
    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "imagenet", "demo_photos.yaml")
    cli = build_cli(["fit", "--config", config, "--data.init_args.streaming", "stream", "--data.init_args.num_workers",
                     "0", "--data.init_args.batch_size", "8", "--trainer.fast_dev_run", "2", "--trainer.logger",
                     "false", "--test_after_fit", "off"])
    assert cli.trainer.global_step == 2 and cli.datamodule.streaming == "stream"


# ------------------------------------------------------------------------------------------------ s3:// URLs
@pytest.fixture(scope="module")
def on_s3(converted, tmp_path_factory):
    """The tiny tree converted by the CLI to ``s3://bucket/imagenet`` on moto's S3 server (a local fake that speaks
    S3's HTTP API), with the environment a user sets for an S3-compatible store: ``AWS_ENDPOINT_URL`` and keys."""
    moto_server = pytest.importorskip("moto.server")
    downloader = pytest.importorskip("litdata.streaming.downloader")
    import boto3

    root, _conv = converted
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    tmp = tmp_path_factory.mktemp("s3")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_CONFIG_FILE": str(tmp / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none")
                            }.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        # The fake serves plain http; litdata's obstore transfers refuse http unless told (S3 itself is https)
        options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
        if options is not None:
            mp.setattr(downloader, "_OBSTORE_CLIENT_OPTIONS", {**options, "allow_http": True})
        client = boto3.client("s3")
        client.create_bucket(Bucket="bucket")
        main(["prepare-data", "convert", str(root), "s3://bucket/imagenet", "--num_workers", "1", "--chunk_bytes",
              "3kb"])
        yield root, "s3://bucket/imagenet", client, tmp
    server.stop()


def test_convert_to_s3_then_stream_gives_the_folder_samples(on_s3):
    root, url, client, tmp = on_s3
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="bucket", Prefix="imagenet/")["Contents"]}
    assert {"imagenet/train/index.json", "imagenet/val/index.json", "imagenet/lightning_methods.json"} <= keys
    assert sum(k.startswith("imagenet/train/chunk-") for k in keys) > 1  # several chunks to shard
    meta = json.loads(client.get_object(Bucket="bucket", Key="imagenet/lightning_methods.json")["Body"].read())
    assert meta["num_classes"] == 4 and meta["splits"]["train"]["samples"] == 24
    folder = _eval_samples(ImageNetDataModule(str(root), **SMALL))
    stream = _eval_samples(ImageNetDataModule(str(root), streaming=url, streaming_cache_dir=str(tmp / "c1"), **SMALL))
    assert len(folder) == 32 and folder.keys() == stream.keys()
    for key, (target, image) in folder.items():
        assert stream[key][0] == target and torch.equal(stream[key][1], image)
    assert len(list((tmp / "c1").rglob("index.json"))) == 2  # train/ and val/ cached in the folder named


def test_mid_epoch_checkpoint_resumes_at_the_next_unseen_sample_on_s3(on_s3, tmp_path):
    """Two DataLoader workers fetching chunks from the bucket: the same batches as an uninterrupted run."""
    root, url, _client, tmp = on_s3
    kwargs = dict(SMALL, data_dir=str(root), streaming=url, num_workers=2, streaming_cache_dir=str(tmp_path / "c"))
    full = _fit(kwargs)
    assert len(full) == 12 and sorted(i for batch, _ in full[:6] for i in batch) == list(range(24))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    first = _fit(kwargs, max_steps=2, callbacks=[ckpt], enable_checkpointing=True)
    rest = _fit(kwargs, ckpt_path=str(tmp_path / "epoch=0-step=2.ckpt"))
    assert first + rest == full


def test_s3_data_sets_are_checked_like_local_ones(on_s3):
    """The class count is checked against the bucket's lightning_methods.json; a data set without one (converted by
    another tool) is read without the check; a bucket that cannot be read stops with the URL and what to check."""
    root, url, client, tmp = on_s3
    with pytest.raises(ValueError, match="s3://bucket/imagenet holds 4 classes .* num_classes=5"):
        ImageNetDataModule(str(root), streaming=url, **dict(SMALL, num_classes=5)).setup("fit")
    copy = {"Bucket": "bucket", "Key": "imagenet/lightning_methods.json"}
    saved = client.get_object(**copy)["Body"].read()
    client.delete_object(**copy)
    try:
        dm = ImageNetDataModule(str(root), streaming=url, streaming_cache_dir=str(tmp / "c2"), **SMALL)
        dm.setup("fit")
        assert len(dm.train_set) == 24
    finally:
        client.put_object(Body=saved, **copy)
    with pytest.raises(OSError, match=r"cannot read s3://no-such-bucket/imagenet/lightning_methods.json: .*"
                                      r"AWS_ENDPOINT_URL"):
        ImageNetDataModule(str(root), streaming="s3://no-such-bucket/imagenet", **SMALL).setup("fit")
