import pyarrow.parquet as pq
import pytest
import torch

from moder.features import FeatureFileError, FeatureTable, read_features, write_features


def _table(model="model-A"):
    generator = torch.Generator().manual_seed(0)
    return FeatureTable(
        torch.nn.functional.normalize(torch.randn(6, 4, generator=generator), dim=-1),
        torch.tensor([0, 0, 1, 1, 2, 2]),
        ["red star", "blue ring", "green cross"],
        "studio",
        model,
    )


def test_round_trip_keeps_vectors_labels_classes_and_producer(tmp_path):
    table = _table()
    write_features(tmp_path / "f.parquet", table)
    back = read_features(tmp_path / "f.parquet", model="model-A")
    assert torch.equal(back.vectors, table.vectors) and torch.equal(back.labels, table.labels)
    assert (back.class_names, back.dataset, back.model) == (table.class_names, "studio", "model-A")
    metadata = pq.read_schema(tmp_path / "f.parquet").metadata
    assert metadata[b"moder.model"] == b"model-A"


def test_features_of_another_model_are_refused_naming_the_file(tmp_path):
    write_features(tmp_path / "f.parquet", _table("model-A"))
    with pytest.raises(
        FeatureFileError, match=r"f.parquet was made by another model:\n  file:     model-A\n  expected: model-B"
    ):
        read_features(tmp_path / "f.parquet", model="model-B")


def test_missing_and_foreign_files_name_the_path(tmp_path):
    with pytest.raises(FeatureFileError, match="feature file not found: .*nowhere.parquet"):
        read_features(tmp_path / "nowhere.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(FeatureFileError, match="junk.parquet: not a readable Parquet file"):
        read_features(tmp_path / "junk.parquet")
    pq.write_table(pq.read_table(_write(tmp_path)).replace_schema_metadata({}), tmp_path / "bare.parquet")
    with pytest.raises(FeatureFileError, match="bare.parquet: not a MoDER feature file"):
        read_features(tmp_path / "bare.parquet")


def _write(tmp_path):
    write_features(tmp_path / "ok.parquet", _table())
    return tmp_path / "ok.parquet"


def test_select_keeps_a_tasks_rows_labelled_by_position():
    vectors, labels = _table().select([2, 0])
    assert labels.tolist() == [1, 1, 0, 0]  # rows of class 0 then class 2, in file order
    assert torch.equal(vectors, _table().vectors[[0, 1, 4, 5]])


def _encode_on_cpu(clip, data, batch_size, decode="workers"):
    """encode_image_split in this process on the CPU, failing on the first undecodable image."""
    from moder.encode import encode_image_split

    return encode_image_split(
        clip.model,
        data,
        batch_size=batch_size,
        workers=0,
        device="cpu",
        precision="fp32",
        skip_bad_images=False,
        where="test",
        skip_hint="",
        decode=decode,
    )


def test_open_clip_preprocess_finished_on_the_device_gives_the_same_features(clip, tmp_path):
    """encode_image_split hands uint8 images to the device and normalises there (UintPreprocess):
    bit for bit what open_clip's whole preprocess in the workers gives."""
    from PIL import Image
    from torchvision import transforms

    from moder.datasets import ImageSplit
    from moder.encode import UintPreprocess, encode_images

    generator = torch.Generator().manual_seed(0)
    files = []
    for i, size in enumerate([(40, 30), (17, 50), (64, 64), (33, 21), (90, 45)]):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels.numpy()).save(files[-1])
    data = ImageSplit([str(f) for f in files], [0, 1, 0, 1, 0], ["a", "b"], transform=clip.preprocess)
    cut = UintPreprocess.of(clip.preprocess)
    assert cut is not None and cut.mean == tuple(clip.identity.mean)
    image = data.read(data.images[0])
    assert cut.to_uint8(image).dtype == torch.uint8
    assert torch.equal(cut.finish(cut.to_uint8(image)[None])[0], clip.preprocess(image))
    whole = encode_images(clip.model, torch.stack([data[i][0] for i in range(len(data))]).split(2))
    features, labels, skipped = _encode_on_cpu(clip, data, batch_size=2)
    assert torch.equal(features, whole) and labels.tolist() == [0, 1, 0, 1, 0] and skipped == []
    assert UintPreprocess.of(transforms.Compose([transforms.ToTensor()])) is None
    assert UintPreprocess.of(lambda image: image) is None


def test_jpeg_files_decoded_on_the_device_match_pil_within_one_level(clip, tmp_path):
    """decode="device": the workers only read JPEG files, which are decoded and resized on the device (the
    CPU here: libjpeg-turbo, PIL's decoder too). A resized pixel differs from PIL's by at most one level of
    255 (torch's bicubic against PIL's), grayscale and CMYK files included; other files, and JPEG files whose
    EXIF asks for a rotation (which TorchCodec applies and PIL does not), take PIL's way, bit for bit; labels
    stay with their images."""
    from PIL import ExifTags, Image

    from moder.datasets import ImageSplit
    from moder.encode import DeviceDecode, JpegFile, UintPreprocess, _Decoded

    generator = torch.Generator().manual_seed(0)
    files = []
    for i, (size, mode) in enumerate(
        [
            ((40, 30), "RGB"),
            ((17, 50), "RGB"),
            ((64, 64), "L"),
            ((33, 21), "CMYK"),
            ((90, 45), "RGB"),
            ((20, 20), "RGB"),
        ]
    ):
        pixels = torch.randint(0, 256, (size[1] // 4 + 1, size[0] // 4 + 1, 3), generator=generator, dtype=torch.uint8)
        image = Image.fromarray(pixels.numpy()).resize(size, Image.Resampling.BICUBIC).convert(mode)
        files.append(tmp_path / (f"{i}.png" if i == 5 else f"{i}.jpg"))
        image.save(files[-1])
    turned = Image.Exif()
    turned[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees to display"
    image.resize((30, 20)).save(tmp_path / "6.jpg", exif=turned.tobytes())
    files.append(tmp_path / "6.jpg")
    labels = [0, 1, 0, 1, 1, 0, 1]
    data = ImageSplit([str(f) for f in files], labels, ["a", "b"], transform=clip.preprocess)
    cut = UintPreprocess.of(clip.preprocess)
    assert cut is not None
    items = [_Decoded(data.with_transform(cut.to_uint8), jpeg_bytes=True)[i][0] for i in range(len(data))]
    assert [isinstance(item, JpegFile) for item in items] == [True] * 5 + [False, False]
    images, kept, bad = DeviceDecode(cut, data.read, "cpu")(items)
    pil = torch.stack([cut.to_uint8(data.read(str(f))) for f in files])
    assert images is not None and kept.tolist() == list(range(7)) and bad == []
    assert images.dtype == torch.uint8 and images.shape == pil.shape
    assert (images.int() - pil.int()).abs().max() <= 1 and torch.equal(images[5:], pil[5:])

    device, device_labels, _ = _encode_on_cpu(clip, data, batch_size=4, decode="device")
    workers, workers_labels, _ = _encode_on_cpu(clip, data, batch_size=4)
    assert device_labels.tolist() == workers_labels.tolist() == labels
    cosine = (device * workers).sum(1)
    # 1 - 1.5e-6 on the machine it was written on
    assert not torch.equal(device, workers) and cosine.min() > 0.9999, cosine


def test_decoding_on_the_device_refuses_a_preprocess_that_cannot_take_tensors(clip):
    from torchvision import transforms

    from moder.datasets import ImageSplit
    from moder.encode import DecodeUnsupported
    from moder.errors import UserError

    pil_only = transforms.Compose(
        [transforms.Lambda(lambda image: image.convert("RGB")), *clip.preprocess.transforms[-2:]]
    )
    for transform, message in (
        (pil_only, r"^extract.decode: device: the preprocess steps Lambda do not take tensors \('Tensor' object"),
        (clip.preprocess.transforms[-1], "^extract.decode: device needs open_clip's .*, not Normalize; set extract"),
    ):
        data = ImageSplit(["a.jpg"], [0], ["a"], transform=transform)
        with pytest.raises(DecodeUnsupported, match=message) as error:
            _encode_on_cpu(clip, data, batch_size=1, decode="device")
        assert "\n" not in str(error.value) and isinstance(error.value, UserError)  # a stage prints it in one line
