//! Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) converted to clipa's formats,
//! behind `clipa data fashion-mnist --out DIR`.
//!
//! Reads the IDX files as Debian's `dataset-fashion-mnist` installs them
//! (`/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz`, or un-gzipped),
//! and writes the 60k training images as WebDataset shards of `<key>.png`
//! grey images with `<key>.txt` captions from CLIP-style prompt templates
//! (OpenCLIP `zero_shot_metadata.py`, varied so the text tower sees more
//! than one sentence per class), and the 10k test images as an image folder
//! with `classnames.txt` for zero-shot evaluation, and again in
//! clip_benchmark's WebDataset layout (`test-wds/`, see
//! [`super::benchmark`]): the same images, so both evaluate alike. Every
//! file is written
//! under a temporary name and renamed, so an interrupted run leaves no
//! half-written shard under a final name.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use image::ImageEncoder;

use super::benchmark::{
    CLASSNAMES_FILE, NSHARDS_FILE, SAMPLES_PER_SHARD, TEMPLATES_FILE, write_labelled_shard,
};
use crate::rng::Rng;
use crate::{Error, Result};

/// The class names in label order, as the dataset's authors give them.
pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Caption templates: `{a}` is the class with its article, `{}` the bare
/// class, both lowercase.
const TEMPLATES: [&str; 8] = [
    "a photo of {a}.",
    "a black and white photo of the {}.",
    "a low resolution photo of {a}.",
    "a grayscale photo of {a}.",
    "a close-up photo of the {}.",
    "a product photo of {a}.",
    "a small photo of the {}.",
    "a centered photo of {a} on a black background.",
];

/// Keys the template stream apart from other uses of the same seed.
const TEMPLATE_STREAM: u64 = 0x464d_4e49_5354;

/// What to convert and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FashionMnistOptions {
    /// Folder with the four IDX files.
    pub input: PathBuf,
    /// Output folder; `train/`, `test/` and `test-wds/` are created inside.
    pub out: PathBuf,
    /// Training samples per tar shard.
    pub samples_per_shard: usize,
    /// Seed of the caption-template choice.
    pub seed: u64,
    /// Convert only the first `n` training images.
    pub limit_train: Option<usize>,
    /// Convert only the first `n` test images.
    pub limit_test: Option<usize>,
}

impl Default for FashionMnistOptions {
    /// Debian's files into `./fashion-mnist`, 10 000 samples per shard.
    fn default() -> Self {
        Self {
            input: DEBIAN_DIR.into(),
            out: "fashion-mnist".into(),
            samples_per_shard: 10_000,
            seed: 0,
            limit_train: None,
            limit_test: None,
        }
    }
}

/// What [`convert`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FashionMnistSummary {
    /// Training samples written.
    pub train_samples: usize,
    /// Training shards written.
    pub train_shards: usize,
    /// The shards as a `--train-data` pattern, e.g.
    /// `OUT/train/shard-{000000..000005}.tar`.
    pub train_pattern: String,
    /// Test images written.
    pub test_samples: usize,
    /// The test image folder (`OUT/test`).
    pub test_dir: PathBuf,
    /// Its class-names file (`OUT/test/classnames.txt`).
    pub classnames: PathBuf,
    /// `test/templates.txt`: the caption templates, for `--templates`.
    pub templates: PathBuf,
    /// The test images in clip_benchmark's layout (`OUT/test-wds`), with
    /// the same class names and templates (`{c}`).
    pub test_wds: PathBuf,
}

/// Converts the training set to shards and the test set to a folder.
pub fn convert(opts: &FashionMnistOptions) -> Result<FashionMnistSummary> {
    if opts.samples_per_shard == 0 || opts.limit_train == Some(0) || opts.limit_test == Some(0) {
        return Err(Error::Config(
            "samples per shard and limits must be positive".into(),
        ));
    }
    let train = Split::read(&opts.input, "train", opts.limit_train)?;
    let test = Split::read(&opts.input, "t10k", opts.limit_test)?;

    let train_dir = opts.out.join("train");
    std::fs::create_dir_all(&train_dir).map_err(|e| Error::io(&train_dir, e))?;
    let shards = train.len().div_ceil(opts.samples_per_shard);
    for s in 0..shards {
        let range = s * opts.samples_per_shard..((s + 1) * opts.samples_per_shard).min(train.len());
        let path = train_dir.join(format!("shard-{s:06}.tar"));
        write_atomic(&path, |w| write_shard(w, &train, range, opts.seed))?;
    }

    let test_dir = opts.out.join("test");
    let folders: Vec<PathBuf> = (0..CLASS_NAMES.len())
        .map(|c| test_dir.join(folder_name(c)))
        .collect();
    for f in &folders {
        std::fs::create_dir_all(f).map_err(|e| Error::io(f, e))?;
    }
    for i in 0..test.len() {
        let path = folders[test.labels[i] as usize].join(format!("{i:05}.png"));
        let png = test.png(i);
        write_atomic(&path, |w| w.write_all(&png))?;
    }
    let classnames = test_dir.join("classnames.txt");
    write_atomic(&classnames, |w| {
        w.write_all(format!("{}\n", CLASS_NAMES.join("\n")).as_bytes())
    })?;
    // The caption templates as zero-shot prompts (`{a}` becomes `a {}`):
    // dataset-specific prompt ensembles are how CLIP evaluates zero-shot.
    let templates = test_dir.join("templates.txt");
    let lines: Vec<String> = TEMPLATES.iter().map(|t| t.replace("{a}", "a {}")).collect();
    write_atomic(&templates, |w| {
        w.write_all(format!("{}\n", lines.join("\n")).as_bytes())
    })?;
    let test_wds = opts.out.join("test-wds");
    write_benchmark(&test_wds, &test, &lines)?;

    Ok(FashionMnistSummary {
        train_samples: train.len(),
        train_shards: shards,
        train_pattern: format!(
            "{}/shard-{{000000..{:06}}}.tar",
            train_dir.display(),
            shards - 1
        ),
        test_samples: test.len(),
        test_dir,
        classnames,
        templates,
        test_wds,
    })
}

/// Writes `test` as clip_benchmark's `root/test/{0..n-1}.tar` with
/// `s%07d.png` + `.cls` samples, `nshards.txt`, the class names and
/// `templates` (their `{}` written as `{c}`).
fn write_benchmark(root: &Path, test: &Split, templates: &[String]) -> Result<()> {
    let split = root.join("test");
    std::fs::create_dir_all(&split).map_err(|e| Error::io(&split, e))?;
    let shards = test.len().div_ceil(SAMPLES_PER_SHARD);
    for s in 0..shards {
        let range = s * SAMPLES_PER_SHARD..((s + 1) * SAMPLES_PER_SHARD).min(test.len());
        let samples = range.map(|i| (i, "png", test.png(i), test.labels[i] as usize));
        write_atomic(&split.join(format!("{s}.tar")), |w| {
            write_labelled_shard(w, samples)
        })?;
    }
    write_atomic(&split.join(NSHARDS_FILE), |w| {
        w.write_all(format!("{shards}\n").as_bytes())
    })?;
    write_atomic(&root.join(CLASSNAMES_FILE), |w| {
        w.write_all(format!("{}\n", CLASS_NAMES.join("\n")).as_bytes())
    })?;
    let templates: Vec<String> = templates.iter().map(|t| t.replace("{}", "{c}")).collect();
    write_atomic(&root.join(TEMPLATES_FILE), |w| {
        w.write_all(format!("{}\n", templates.join("\n")).as_bytes())
    })
}

/// `NN_slug`: sorts in label order and is a valid folder name.
fn folder_name(label: usize) -> String {
    let slug: String = CLASS_NAMES[label]
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{label:02}_{slug}")
}

/// The caption of training sample `index`.
fn caption(label: usize, index: usize, seed: u64) -> String {
    let name = CLASS_NAMES[label].to_lowercase();
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    let t = TEMPLATES[Rng::keyed(&[seed, index as u64, TEMPLATE_STREAM]).below(TEMPLATES.len())];
    t.replace("{a}", &format!("{article} {name}"))
        .replace("{}", &name)
}

fn write_shard(
    w: &mut dyn Write,
    train: &Split,
    range: std::ops::Range<usize>,
    seed: u64,
) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(w);
    for i in range {
        let label = train.labels[i] as usize;
        let members = [
            ("png", train.png(i)),
            ("txt", caption(label, i, seed).into_bytes()),
        ];
        for (ext, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0); // Same input, same bytes.
            tar.append_data(&mut h, format!("{i:06}.{ext}"), data.as_slice())?;
        }
    }
    tar.into_inner()?.flush()
}

/// Writes through `fill` to `path.tmp`, then renames onto `path`.
fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = BufWriter::new(file);
    fill(&mut w)
        .and_then(|()| w.flush())
        .map_err(|e| Error::io(&tmp, e))?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The images and labels of one split.
struct Split {
    rows: u32,
    cols: u32,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

impl Split {
    /// Reads `{prefix}-images-idx3-ubyte[.gz]` and the labels beside it.
    fn read(dir: &Path, prefix: &str, limit: Option<usize>) -> Result<Self> {
        let (img_path, mut images) = open_idx(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let (lbl_path, mut labels) = open_idx(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        let dims = read_header(&img_path, &mut images, 3)?;
        let n_labels = read_header(&lbl_path, &mut labels, 1)?[0];
        let (n, rows, cols) = (dims[0], dims[1], dims[2]);
        if n != n_labels {
            let reason = format!("{n} images but {n_labels} labels in {}", lbl_path.display());
            return Err(Error::Format {
                path: img_path,
                reason,
            });
        }
        if !(1..=4096).contains(&rows) || !(1..=4096).contains(&cols) {
            return Err(Error::Format {
                path: img_path,
                reason: format!("image size {rows}x{cols}"),
            });
        }
        let n = limit.map_or(n as usize, |l| l.min(n as usize));
        let pixels = read_body(
            &img_path,
            &mut images,
            n * (rows * cols) as usize,
            limit.is_none(),
        )?;
        let labels = read_body(&lbl_path, &mut labels, n, limit.is_none())?;
        if let Some(i) = labels.iter().position(|&l| l as usize >= CLASS_NAMES.len()) {
            return Err(Error::Format {
                path: lbl_path,
                reason: format!("label {} at index {i}", labels[i]),
            });
        }
        Ok(Self {
            rows,
            cols,
            pixels,
            labels,
        })
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    /// Image `i` as an 8-bit grey PNG.
    fn png(&self, i: usize) -> Vec<u8> {
        let size = (self.rows * self.cols) as usize;
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(
                &self.pixels[i * size..(i + 1) * size],
                self.cols,
                self.rows,
                image::ExtendedColorType::L8,
            )
            .expect("encoding a buffer of the stated size into memory cannot fail");
        out
    }
}

/// Opens `name.gz` or `name` in `dir`, un-gzipping by magic bytes.
fn open_idx(dir: &Path, name: &str) -> Result<(PathBuf, Box<dyn Read>)> {
    let path = [dir.join(format!("{name}.gz")), dir.join(name)]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Config(format!(
                "neither {name}.gz nor {name} in {} (apt install dataset-fashion-mnist)",
                dir.display()
            ))
        })?;
    let mut file = BufReader::new(std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?);
    let gzip = file
        .fill_buf()
        .map_err(|e| Error::io(&path, e))?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok((path, reader))
}

/// Checks the magic (`0 0 0x08 ndim`: unsigned bytes, `ndim` dimensions)
/// and returns the dimensions.
fn read_header(path: &Path, r: &mut dyn Read, ndim: u8) -> Result<Vec<u32>> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).map_err(|e| Error::io(path, e))?;
    if magic != [0, 0, 0x08, ndim] {
        let reason = format!(
            "magic {magic:02x?} is not an IDX file of unsigned bytes with {ndim} dimensions"
        );
        return Err(Error::Format {
            path: path.into(),
            reason,
        });
    }
    (0..ndim)
        .map(|_| {
            let mut d = [0u8; 4];
            r.read_exact(&mut d).map_err(|e| Error::io(path, e))?;
            Ok(u32::from_be_bytes(d))
        })
        .collect()
}

/// Reads `len` bytes; with `whole`, also checks nothing follows them.
fn read_body(path: &Path, r: &mut dyn Read, len: usize, whole: bool) -> Result<Vec<u8>> {
    // A corrupt header may claim petabytes: grow with the data instead.
    let mut buf = Vec::with_capacity(len.min(1 << 26));
    r.take(len as u64)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    let mut extra = [0u8; 1];
    if buf.len() < len || (whole && r.read(&mut extra).map_err(|e| Error::io(path, e))? > 0) {
        let reason = format!(
            "data size does not match the header ({} bytes expected)",
            len
        );
        return Err(Error::Format {
            path: path.into(),
            reason,
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::folder::ImageFolder;
    use crate::data::shards::WebDataset;
    use crate::data::{DataStats, ImagePayload, ShardSource};

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        dims.iter().for_each(|d| out.extend(d.to_be_bytes()));
        out.extend(data);
        out
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// 2×3 images whose pixel `p` of image `i` is `10 i + p`; train images
    /// gzipped, the rest plain.
    fn tiny(train: &[u8], test: &[u8]) -> tempfile::TempDir {
        let d_tmp = tempfile::tempdir().unwrap();

        let d = d_tmp.path();
        let pixels = |n: usize| {
            (0..n * 6)
                .map(|k| ((k / 6) * 10 + k % 6) as u8)
                .collect::<Vec<u8>>()
        };
        let images = |n: usize| idx(&[n as u32, 2, 3], &pixels(n));
        std::fs::write(
            d.join("train-images-idx3-ubyte.gz"),
            gz(&images(train.len())),
        )
        .unwrap();
        std::fs::write(
            d.join("train-labels-idx1-ubyte"),
            idx(&[train.len() as u32], train),
        )
        .unwrap();
        std::fs::write(d.join("t10k-images-idx3-ubyte"), images(test.len())).unwrap();
        std::fs::write(
            d.join("t10k-labels-idx1-ubyte.gz"),
            gz(&idx(&[test.len() as u32], test)),
        )
        .unwrap();
        d_tmp
    }

    fn options(input: &Path, out: &str) -> FashionMnistOptions {
        let out = input.join(out);
        FashionMnistOptions {
            input: input.into(),
            out,
            samples_per_shard: 3,
            seed: 7,
            ..Default::default()
        }
    }

    #[test]
    fn converts_tiny_idx_and_reads_back() {
        let d_tmp = tiny(&[0, 1, 9, 3, 4, 5, 6], &[9, 0, 0, 2]);
        let d = d_tmp.path();
        let sum = convert(&options(d, "out")).unwrap();
        assert_eq!(
            (sum.train_samples, sum.train_shards, sum.test_samples),
            (7, 3, 4)
        );
        assert!(
            sum.train_pattern
                .ends_with("out/train/shard-{000000..000002}.tar"),
            "{}",
            sum.train_pattern
        );

        let ds = WebDataset::from_spec(&sum.train_pattern, None).unwrap();
        let stats = DataStats::default();
        let samples: Vec<_> = (0..3)
            .flat_map(|i| ds.open(i, &stats).unwrap().collect::<Vec<_>>())
            .collect();
        assert_eq!(samples.len(), 7);
        assert_eq!(samples[2].key, "shard-000000.tar/000002");
        assert!(
            samples[2].caption.contains(" ankle boot"),
            "{}",
            samples[2].caption
        );
        assert!(
            samples[0].caption.contains(" t-shirt/top"),
            "{}",
            samples[0].caption
        );
        let ImagePayload::Encoded(png) = &samples[4].image else {
            panic!("shards hold encoded images")
        };
        let img = image::load_from_memory(png).unwrap().to_luma8();
        assert_eq!((img.width(), img.height()), (3, 2));
        assert_eq!(img.into_raw(), [40, 41, 42, 43, 44, 45]);
        let templates: std::collections::HashSet<String> = samples
            .iter()
            .map(|s| s.caption.split(" of").next().unwrap().to_string())
            .collect();
        assert!(templates.len() >= 2, "{templates:?}");

        let folder = ImageFolder::open(&sum.test_dir, Some(&sum.classnames)).unwrap();
        assert_eq!(folder.classes, CLASS_NAMES);
        let labels: Vec<usize> = folder.files().iter().map(|f| f.1).collect();
        assert_eq!(labels, [0, 0, 2, 9]);
        assert!(folder.files()[3].0.ends_with("09_ankle_boot/00000.png"));

        // The same test images in clip_benchmark's layout, in index order.
        let wds = crate::eval::ZeroShotData::open(&sum.test_wds, None).unwrap();
        let task = wds.task(false, None).unwrap();
        assert_eq!(task.classnames, CLASS_NAMES);
        assert_eq!(task.templates[0], "a photo of a {}.");
        let read: Vec<(String, Option<usize>)> = wds
            .source()
            .open(0, &stats)
            .unwrap()
            .map(|s| (s.key, s.label))
            .collect();
        assert_eq!(read[0], ("0.tar/s0000000".to_string(), Some(9)));
        let labels: Vec<usize> = read.iter().map(|r| r.1.unwrap()).collect();
        assert_eq!(labels, [9, 0, 0, 2]);
        assert_eq!(
            std::fs::read_to_string(sum.test_wds.join("test/nshards.txt")).unwrap(),
            "1\n"
        );

        // Same input and seed, same bytes.
        let again = convert(&options(d, "again")).unwrap();
        let shard =
            |root: &str| std::fs::read(d.join(root).join("train/shard-000001.tar")).unwrap();
        assert_eq!(shard("out"), shard("again"));
        assert_eq!(again.train_shards, 3);
    }

    #[test]
    fn rejects_bad_idx_files() {
        let err = |d: &Path| convert(&options(d, "out")).unwrap_err().to_string();
        let d_tmp = tiny(&[0, 1, 2], &[3, 12]);
        let d = d_tmp.path();
        assert!(err(d).contains("label 12 at index 1"), "{}", err(d));
        std::fs::write(d.join("t10k-labels-idx1-ubyte.gz"), idx(&[3], &[1, 2, 3])).unwrap();
        assert!(err(d).contains("2 images but 3 labels"), "{}", err(d));
        std::fs::write(d.join("t10k-images-idx3-ubyte"), idx(&[3, 2, 3], &[0; 17])).unwrap();
        assert!(err(d).contains("data size does not match"), "{}", err(d));
        std::fs::write(d.join("train-images-idx3-ubyte.gz"), idx(&[3, 2], &[0; 6])).unwrap();
        assert!(err(d).contains("is not an IDX file"), "{}", err(d));
        std::fs::remove_file(d.join("train-images-idx3-ubyte.gz")).unwrap();
        assert!(
            err(d).contains("neither train-images-idx3-ubyte.gz nor"),
            "{}",
            err(d)
        );
    }

    #[test]
    fn debian_package_files_if_installed() {
        let input = Path::new(DEBIAN_DIR);
        if !input.is_dir() {
            // `ci/run.sh` installs the package; elsewhere say why nothing ran.
            eprintln!(
                "SKIPPED debian_package_files_if_installed: {DEBIAN_DIR} not found (apt-get install dataset-fashion-mnist)"
            );
            return;
        }
        let out_tmp = tempfile::tempdir().unwrap();

        let out = out_tmp.path().join("run");
        let opts = FashionMnistOptions {
            input: input.into(),
            out: out.to_path_buf(),
            samples_per_shard: 20,
            seed: 0,
            limit_train: Some(50),
            limit_test: Some(20),
        };
        let sum = convert(&opts).unwrap();
        assert_eq!(
            (sum.train_samples, sum.train_shards, sum.test_samples),
            (50, 3, 20)
        );
        let ds = WebDataset::from_spec(&sum.train_pattern, None).unwrap();
        let stats = DataStats::default();
        let samples: Vec<_> = (0..3)
            .flat_map(|i| ds.open(i, &stats).unwrap().collect::<Vec<_>>())
            .collect();
        assert_eq!(samples.len(), 50);
        // The first training labels are 9 (ankle boot), 0 (T-shirt/top).
        assert!(
            samples[0].caption.contains("ankle boot") && samples[1].caption.contains("t-shirt/top")
        );
        let ImagePayload::Encoded(png) = &samples[0].image else {
            panic!("shards hold encoded images")
        };
        assert_eq!(
            image::load_from_memory(png)
                .unwrap()
                .to_luma8()
                .dimensions(),
            (28, 28)
        );
        let folder = ImageFolder::open(&sum.test_dir, Some(&sum.classnames)).unwrap();
        assert_eq!(
            (folder.len(), folder.classes[9].as_str()),
            (20, "Ankle boot")
        );
        // The first test label is 9.
        assert!(
            folder
                .files()
                .iter()
                .any(|(p, l)| *l == 9 && p.ends_with("00000.png"))
        );
    }
}
