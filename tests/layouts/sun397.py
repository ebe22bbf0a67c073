"""Fake SUN397: root/SUN397/ClassName.txt (all 397 class paths) and
root/SUN397/<letter>/<class path>/sun_<16 letters>.jpg for the first n_classes classes, per_class images
per class in all. An image of class c is 8 pixels high and 8 + c wide, every third one grayscale."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from PIL import Image

from moder.datasets import catalog

# The SUN397 classes stored two folders deep (ClassName.txt line /a/apse/indoor); every other class
# path is its CLIP name with "_" for " " (/a/airplane_cabin is "airplane cabin").
_TWO_LEVEL = """
    apartment_building/outdoor apse/indoor arrival_gate/outdoor athletic_field/outdoor atrium/public
    badminton_court/indoor bakery/shop balcony/exterior balcony/interior basketball_court/outdoor
    bazaar/indoor bazaar/outdoor bistro/indoor booth/indoor bow_window/indoor bow_window/outdoor
    brewery/indoor cabin/outdoor canal/natural canal/urban car_interior/backseat
    car_interior/frontseat casino/indoor cathedral/indoor cathedral/outdoor cavern/indoor
    chicken_coop/indoor chicken_coop/outdoor church/indoor church/outdoor cloister/indoor
    control_tower/outdoor covered_bridge/exterior cubicle/office desert/sand desert/vegetation
    diner/indoor diner/outdoor dinette/home dinette/vehicle doorway/outdoor driving_range/outdoor
    elevator/door elevator/interior escalator/indoor factory/indoor field/cultivated field/wild
    firing_range/indoor florist_shop/indoor forest/broadleaf forest/needleleaf garage/indoor
    gazebo/exterior general_store/indoor general_store/outdoor greenhouse/indoor greenhouse/outdoor
    gymnasium/indoor hangar/indoor hangar/outdoor hot_tub/outdoor hotel/outdoor
    hunting_lodge/outdoor ice_skating_rink/indoor ice_skating_rink/outdoor inn/outdoor
    jacuzzi/indoor jail/indoor kennel/indoor kennel/outdoor labyrinth/outdoor lake/natural
    library/indoor library/outdoor lido_deck/outdoor market/indoor market/outdoor moat/water
    monastery/outdoor mosque/indoor mosque/outdoor movie_theater/indoor museum/indoor
    nuclear_power_plant/outdoor observatory/outdoor oil_refinery/outdoor outhouse/outdoor
    parking_garage/indoor parking_garage/outdoor pilothouse/indoor planetarium/outdoor podium/indoor
    podium/outdoor poolroom/establishment poolroom/home power_plant/outdoor pub/indoor
    shopping_mall/indoor stadium/baseball stadium/football stage/indoor subway_station/platform
    swimming_pool/indoor swimming_pool/outdoor synagogue/indoor synagogue/outdoor temple/east_asia
    temple/south_asia tennis_court/indoor tennis_court/outdoor tent/outdoor theater/indoor_procenium
    theater/indoor_seats track/outdoor train_station/platform underwater/coral_reef
    volleyball_court/indoor volleyball_court/outdoor warehouse/indoor waterfall/block waterfall/fan
    waterfall/plunge wine_cellar/barrel_storage wine_cellar/bottle_storage wrestling_ring/indoor
""".split()
_BY_NAME = {path.replace("/", " ").replace("_", " "): path for path in _TWO_LEVEL}


def class_path(name: str) -> str:
    """ClassName.txt line of a class, e.g. "/a/apse/indoor" for "apse indoor"."""
    path = _BY_NAME.get(name, name.replace(" ", "_"))
    return f"/{path[0]}/{path}"


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = root / "SUN397"
    base.mkdir(parents=True, exist_ok=True)
    paths = [class_path(name) for name in catalog("sun397").class_names]
    (base / "ClassName.txt").write_text("".join(f"{path}\n" for path in paths))
    letters = np.array(list(string.ascii_lowercase))
    for c, path in enumerate(paths[:n_classes]):
        folder = base / path.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            shape = (8, 8 + c) if k % 3 == 2 else (8, 8 + c, 3)
            image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            image.save(folder / f"sun_{''.join(rng.choice(letters, 16))}.jpg")
