"""Brains, sections and areas tables: validation errors name the table, row, column or id at fault."""

import numpy as np
import pytest

from cytonet.io.tables import TableError, load_areas, load_brains, load_sections
from cytonet.io.transforms import SectionTransform

AFFINE = "0.004 0 0 0  0 0.004 0 0  0 0 0 1.2"


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def images(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_sections_table_resolves_paths_and_z(images):
    table = write(images / "s.csv", f"section_id,image,z_um,transform\ns1,a.png,20,{AFFINE}\ns2,b.png,40,{AFFINE}\n")
    sections = load_sections(table, brain_id="b1")
    assert list(sections.section_id) == ["s1", "s2"]
    assert sections.image[0] == str((images / "a.png").resolve())
    assert sections.z_um.tolist() == [20.0, 40.0]
    assert (sections.brain_id == "b1").all()


def test_tsv_and_section_index(images):
    table = write(images / "s.tsv", f"section_id\timage\tsection_index\ttransform\n007\ta.png\t3\t{AFFINE}\n")
    sections = load_sections(table, section_thickness_um=20)
    assert sections.section_id[0] == "007"  # ids stay text
    assert sections.z_um[0] == 60.0


def test_duplicate_section_id_named(images):
    table = write(images / "s.csv", f"section_id,image,z_um,transform\ns1,a.png,0,{AFFINE}\ns1,b.png,1,{AFFINE}\n")
    with pytest.raises(TableError, match=r"duplicate section_id \['s1'\]"):
        load_sections(table)


def test_missing_image_named_with_section(images):
    table = write(images / "s.csv", f"section_id,image,z_um,transform\ns9,missing.tif,0,{AFFINE}\n")
    with pytest.raises(TableError, match=r"section 's9': image file not found: .*missing\.tif"):
        load_sections(table)


def test_unknown_column_named(images):
    table = write(images / "s.csv", f"section_id,image,z_um,transform,pixelsize\ns1,a.png,0,{AFFINE},2\n")
    with pytest.raises(TableError, match=r"unknown column\(s\) \['pixelsize'\]"):
        load_sections(table)


def test_bad_number_named_with_line_and_column(images):
    table = write(images / "s.csv", f"section_id,image,z_um,pixel_size_um,transform\ns1,a.png,0,two,{AFFINE}\n")
    with pytest.raises(TableError, match=r"line 2, column 'pixel_size_um': 'two' is not a number"):
        load_sections(table)


def test_bad_transform_named(images):
    table = write(images / "s.csv", "section_id,image,z_um,transform\ns1,a.png,0,1 2 3\n")
    with pytest.raises(TableError, match=r"section 's1': bad transform: expected 12 numbers"):
        load_sections(table)


def test_missing_z_named(images):
    table = write(images / "s.csv", f"section_id,image,transform\ns1,a.png,{AFFINE}\n")
    with pytest.raises(TableError, match=r"section 's1' has no z_um"):
        load_sections(table)


def test_areas_table(tmp_path):
    table = write(tmp_path / "areas.csv", "area_id,name,color\n2,PB,#00ff00\n1,FA,#ff0000\n")
    areas = load_areas(table)
    assert areas.name.tolist() == ["FA", "PB"]
    bad = write(tmp_path / "bad.csv", "area_id,name,color\n1,FA,red\n")
    with pytest.raises(TableError, match=r"line 2, column 'color'"):
        load_areas(bad)
    dup = write(tmp_path / "dup.csv", "area_id,name,color\n1,FA,#ff0000\n2,FA,#00ff00\n")
    with pytest.raises(TableError, match=r"duplicate name \['FA'\]"):
        load_areas(dup)


def test_brains_table(images):
    write(images / "s.csv", f"section_id,image,z_um,transform\ns1,a.png,0,{AFFINE}\n")
    table = write(images / "brains.csv", "brain_id,sections,role\nB1,s.csv,known\nB2,nope.csv,unknown\n")
    with pytest.raises(TableError, match=r"sections table of brain 'B2' not found"):
        load_brains(table)
    bad_role = write(images / "b2.csv", "brain_id,sections,role\nB1,s.csv,maybe\n")
    with pytest.raises(TableError, match=r"column 'role'"):
        load_brains(bad_role)


def test_transform_affine_and_field(tmp_path):
    t = SectionTransform.from_spec(AFFINE)
    xyz = t.to_mm([0, 250], [0, 500])
    np.testing.assert_allclose(xyz, [[0, 0, 1.2], [1.0, 2.0, 1.2]])
    field = np.zeros((3, 3, 3), np.float32)
    field[2] = 0.5  # constant z shift
    np.savez(tmp_path / "t.npz", affine=np.array(AFFINE.split(), float).reshape(3, 4), field=field, field_step_px=100)
    t2 = SectionTransform.from_spec("t.npz", tmp_path)
    np.testing.assert_allclose(t2.to_mm([50], [50]), [[0.2, 0.2, 1.7]])
    assert SectionTransform.from_spec(t.to_spec()).affine.tolist() == t.affine.tolist()


def test_optional_path_columns_may_be_empty(images):
    table = write(images / "s.csv",
                  f"section_id,image,z_um,transform,annotation\ns1,a.png,0,{AFFINE},b.png\ns2,a.png,1,{AFFINE},\n")
    sections = load_sections(table)
    assert sections.annotation[0] == str((images / "b.png").resolve())
    assert sections.annotation.isna()[1]
