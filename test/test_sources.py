"""Readers: image folders with a poses CSV, rosbag2 (MCAP and sqlite3) written with our own writer."""
import cv2
import numpy as np
import pytest

from fol_ros.errors import BadInputError, ConfigError
from fol_ros.records import Pose
from fol_ros.sources import (BagSource, ImageFolderSource, bag_topics, read_bag_frames, read_bag_images,
                             read_bag_poses, read_poses_csv, write_bag)


def _images(n, h=24, w=32, seed=0):
    rng = np.random.default_rng(seed)
    # smooth content, so JPEG round trips stay close
    return [cv2.resize(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8), (w, h),
                       interpolation=cv2.INTER_LINEAR) for _ in range(n)]


def test_image_folder_with_poses_csv(tmp_path):
    imgs = _images(3)
    for i, img in enumerate(imgs):
        cv2.imwrite(str(tmp_path / f'f{i:02d}.png'), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (tmp_path / 'notes.txt').write_text('not an image')
    csv = tmp_path / 'poses.csv'
    csv.write_text('id,stamp,x,y,z,qx,qy,qz,qw\n'
                   'f00.png,10.5,1,2,3,0,0,0,1\n'
                   'f01,1700000000123456789,4,5,6,0,0,0.7071068,0.7071068\n')
    frames = list(ImageFolderSource(tmp_path, csv, pose_frame='odom'))
    assert [f.source for f in frames] == ['f00.png', 'f01.png', 'f02.png']
    assert np.array_equal(frames[1].image, imgs[1])
    assert frames[0].stamp_ns == 10_500_000_000 and frames[0].pose.position == (1.0, 2.0, 3.0)
    assert frames[0].pose.frame_id == 'odom'
    assert frames[1].stamp_ns == 1700000000123456789 and frames[1].pose.orientation[2] == pytest.approx(0.7071068)
    assert frames[2].pose is None and frames[2].stamp_ns == 2_000_000_000


def test_poses_csv_rejects_bad_rows(tmp_path):
    bad = tmp_path / 'p.csv'
    bad.write_text('a,1,2,3\n')
    with pytest.raises(BadInputError, match='9 columns'):
        read_poses_csv(bad)
    bad.write_text('a,1,0,0,0,0,0,0,0\n')
    with pytest.raises(BadInputError, match='quaternion'):
        read_poses_csv(bad)
    with pytest.raises(ConfigError, match='not found'):
        ImageFolderSource(tmp_path / 'nope')


@pytest.mark.parametrize('storage,compressed,pose_type', [('mcap', False, 'odometry'),
                                                           ('sqlite3', True, 'pose_stamped')])
def test_bag_roundtrip_with_nearest_pose(tmp_path, storage, compressed, pose_type):
    imgs = _images(4, 48, 64)
    img_stamps = [1_000_000_000 + i * 500_000_000 for i in range(4)]
    # poses at 10 Hz offset by 20 ms; nothing near the last image (beyond the 0.1 s tolerance)
    pose_stamps = [s + 20_000_000 for s in range(900_000_000, 2_300_000_000, 100_000_000)]
    poses = [(s, Pose((s / 1e9, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), 'map')) for s in pose_stamps]
    bag = write_bag(tmp_path / 'bag', zip(img_stamps, imgs), poses, storage=storage, compressed=compressed,
                    pose_type=pose_type)
    topics = bag_topics(bag)
    assert topics['/camera/image_raw'][1] == 4 and topics['/odom'][1] == len(poses)
    source = BagSource(bag, '/camera/image_raw', '/odom', tolerance_s=0.1)
    frames = list(source)
    assert len(source) == 4 and [f.stamp_ns for f in frames] == img_stamps
    for f, img in zip(frames, imgs):
        err = np.abs(f.image.astype(int) - img).mean()
        assert err == 0 if not compressed else err < 6, (err, f.stamp_ns)
    assert frames[0].pose.position[0] == pytest.approx(1.02)
    assert frames[2].pose.position[0] == pytest.approx(2.02)
    assert frames[3].pose is None                                  # 2.5 s: nearest pose 2.22 s, beyond 0.1 s
    assert frames[0].frame_id == 'camera' and frames[0].source == '/camera/image_raw#0'
    assert [s for s, _ in read_bag_poses(bag, '/odom')] == pose_stamps
    assert len(list(read_bag_images(bag, '/camera/image_raw'))) == 4
    assert len(list(read_bag_frames(bag, '/camera/image_raw'))) == 4


def test_bag_wrong_topic_lists_the_topics(tmp_path):
    bag = write_bag(tmp_path / 'bag', [(1, _images(1)[0])], [])
    with pytest.raises(ConfigError, match=r'/camera/image_raw \(sensor_msgs/msg/Image\)'):
        BagSource(bag, '/wrong')
    with pytest.raises(ConfigError, match='pose topic'):
        list(read_bag_poses(bag, '/camera/image_raw'))
    with pytest.raises(ConfigError, match='not found'):
        BagSource(tmp_path / 'missing', '/x')
