/* Region decoding of sequential JPEGs through libjpeg(-turbo)'s API: only the rows and iMCU columns that a
 * box covers go through the inverse DCT, upsampling and colour conversion, and decoding stops at the box's
 * last row. The pixels are those of a whole-image decode cut to the box (accurate integer IDCT, fancy
 * upsampling: what Pillow and simplejpeg use), which `tests/data/test_jpeg_region.py` checks bit for bit.
 *
 * Two things make a region decode differ from a cut of the whole image unless handled:
 *  - libjpeg-turbo widens a column crop to whole iMCU columns and upsamples the chroma of the crop as if
 *    its first and last columns were the image's edges. Asking for one more column on each side (when the
 *    image has one) gives the box's own edge pixels their true neighbours; the extra columns are cut here.
 *  - libjpeg reports corrupt or cut-short data as a warning and goes on with grey blocks. Here every
 *    warning is an error (as simplejpeg's strict mode), so a bad file raises ValueError for the caller's
 *    bad-image handling, never a crash: errors long-jump out of libjpeg to the one clean-up below.
 *
 * A file with a restart marker after every MCU (`transcode_restart_every_mcu`, used by `mimkit data pack
 * --mcu-index`) is decoded at full size from the MCUs around the box alone (below), so the entropy decoding
 * above and beside the box is skipped too.
 *
 * Python: decode_region(data, top, left, height, width, scale_denom, channels) -> bytearray of
 * height * width * channels bytes, row-major `[height, width, channels]`; the box is in the frame of the
 * image decoded at 1/scale_denom (libjpeg's DCT scaling), channels 1 (grey) or 3 (RGB);
 * transcode_restart_every_mcu(data) -> bytes, the file re-encoded losslessly with restart interval 1.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

/* Rows asked of libjpeg per read: it returns what one pass of its upsampler makes (up to an iMCU row),
 * so one row per call would add a call per row. */
#define ROWS_PER_READ 16
#define MIN_SMOOTHED_COLUMNS 5 /* a 2x-subsampled crop this wide has 3 chroma samples: libjpeg smooths it */

/* libjpeg's error manager, extended with where to jump on an error and the message to raise. */
typedef struct {
    struct jpeg_error_mgr base;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
} ErrorTrap;

static void escape_on_error(j_common_ptr cinfo)
{
    ErrorTrap *trap = (ErrorTrap *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, trap->message);
    longjmp(trap->escape, 1);
}

static void escape_on_warning(j_common_ptr cinfo, int level)
{
    if (level < 0) /* a warning (corrupt data, premature end); levels >= 0 are trace messages */
        escape_on_error(cinfo);
}

/* Decode the box into `out` (height * width * channels bytes). NULL on success, else the error message
 * (in `trap`). Calls no Python API: it runs with the GIL released. */
static const char *decode_box(const unsigned char *data, unsigned long size, JDIMENSION top, JDIMENSION left,
                              JDIMENSION height, JDIMENSION width, unsigned int scale_denom, int channels,
                              unsigned char *out, ErrorTrap *trap)
{
    struct jpeg_decompress_struct cinfo;
    JSAMPLE *volatile rows = NULL; /* set after the long jump's target: volatile, so the clean-up sees it */
    JDIMENSION first_col, decoded_width, right, skipped;
    JSAMPROW row_pointers[ROWS_PER_READ];
    size_t box_bytes = (size_t)width * channels, decoded_bytes;
    int i;

    cinfo.err = jpeg_std_error(&trap->base);
    trap->base.error_exit = escape_on_error;
    trap->base.emit_message = escape_on_warning;
    if (setjmp(trap->escape)) {
        jpeg_destroy_decompress(&cinfo);
        free(rows);
        return trap->message;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.num_components != channels) {
        snprintf(trap->message, JMSG_LENGTH_MAX, "%d components, %d asked for", cinfo.num_components,
                 channels);
        longjmp(trap->escape, 1);
    }
    cinfo.out_color_space = channels == 1 ? JCS_GRAYSCALE : JCS_RGB;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    cinfo.scale_num = 1;
    cinfo.scale_denom = scale_denom;
    jpeg_start_decompress(&cinfo);
    if (left + width > cinfo.output_width || top + height > cinfo.output_height) {
        snprintf(trap->message, JMSG_LENGTH_MAX, "box %ux%u at (%u, %u) outside the %ux%u image", width,
                 height, left, top, cinfo.output_width, cinfo.output_height);
        longjmp(trap->escape, 1);
    }

    /* One column more on each side, so the box's edge pixels are upsampled from their true neighbours. */
    first_col = left > 0 ? left - 1 : 0;
    right = left + width < cinfo.output_width ? left + width + 1 : cinfo.output_width;
    /* libjpeg upsamples a crop whose subsampled width is 2 samples or less without smoothing, unlike the
       whole image: keep at least 5 columns where the image has them. */
    if (right - first_col < MIN_SMOOTHED_COLUMNS) {
        right = first_col + MIN_SMOOTHED_COLUMNS < cinfo.output_width ? first_col + MIN_SMOOTHED_COLUMNS
                                                                      : cinfo.output_width;
        first_col = right > MIN_SMOOTHED_COLUMNS ? right - MIN_SMOOTHED_COLUMNS : 0;
    }
    decoded_width = right - first_col;
    if (decoded_width < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &first_col, &decoded_width); /* widened to iMCU columns */

    skipped = jpeg_skip_scanlines(&cinfo, top);
    if (skipped != top) {
        snprintf(trap->message, JMSG_LENGTH_MAX, "skipped %u of %u rows", skipped, top);
        longjmp(trap->escape, 1);
    }
    decoded_bytes = (size_t)decoded_width * channels;
    rows = malloc(decoded_bytes * ROWS_PER_READ);
    if (rows == NULL) {
        snprintf(trap->message, JMSG_LENGTH_MAX, "out of memory");
        longjmp(trap->escape, 1);
    }
    for (i = 0; i < ROWS_PER_READ; i++)
        row_pointers[i] = rows + i * decoded_bytes;
    while (cinfo.output_scanline < top + height) {
        JDIMENSION at = cinfo.output_scanline - top, remaining = top + height - cinfo.output_scanline;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, row_pointers,
                                             remaining < ROWS_PER_READ ? remaining : ROWS_PER_READ);
        if (got == 0) { /* only a suspending data source returns none; the memory source never does */
            snprintf(trap->message, JMSG_LENGTH_MAX, "no row at %u", cinfo.output_scanline);
            longjmp(trap->escape, 1);
        }
        for (JDIMENSION r = 0; r < got; r++)
            memcpy(out + (at + r) * box_bytes, row_pointers[r] + (size_t)(left - first_col) * channels,
                   box_bytes);
    }
    jpeg_destroy_decompress(&cinfo); /* the rows below the box are never decoded */
    free(rows);
    return NULL;
}

/* ---- MCU-indexed files: restart interval 1, so any rectangle of MCUs decodes on its own ---------------
 *
 * A file with a restart marker after every MCU (written by `transcode_restart_every_mcu` at pack time)
 * starts each MCU's entropy data on a byte boundary with the DC predictions reset. The box's MCUs (plus a
 * neighbour where the box's edge pixels need one for fancy upsampling) are copied into a small JPEG of their
 * own, with the original tables, the frame's size set to the rectangle's and the restart markers numbered
 * anew, and only that is decoded: the entropy decoding above and beside the box is skipped too. */

/* The frame and scan of a file whose scan can be cut into MCUs: one interleaved scan, restart interval 1. */
typedef struct {
    size_t frame_size_at; /* offset of the frame header's height field (width follows) */
    size_t scan_at;       /* offset of the first byte of entropy-coded data */
    int height, width, mcu_height, mcu_width;
    int fancy_across, fancy_down; /* some component is upsampled 2x (fancy: reads a neighbouring sample) */
} McuLayout;

/* Fill `layout` from the markers before the scan. 0 when the file is not one interleaved sequential scan
 * with a restart marker after every MCU (the caller then decodes it as any other file). */
static int read_mcu_layout(const unsigned char *data, size_t size, McuLayout *layout)
{
    size_t pos = 2;
    int components = 0, restart_interval = 0, h_max = 1, v_max = 1, sampling[3][2] = {{0}};
    memset(layout, 0, sizeof(*layout));
    while (pos + 4 <= size && data[pos] == 0xFF) {
        int marker = data[pos + 1];
        size_t length = ((size_t)data[pos + 2] << 8) | data[pos + 3];
        if (length < 2 || pos + 2 + length > size)
            return 0;
        if (marker == 0xC0 || marker == 0xC1) { /* baseline or extended sequential, Huffman */
            if (length < 8)
                return 0;
            components = data[pos + 9];
            if ((components != 1 && components != 3) || length < 8 + 3 * (size_t)components)
                return 0;
            layout->frame_size_at = pos + 5;
            layout->height = (data[pos + 5] << 8) | data[pos + 6];
            layout->width = (data[pos + 7] << 8) | data[pos + 8];
            for (int c = 0; c < components; c++) {
                sampling[c][0] = data[pos + 11 + 3 * c] >> 4;
                sampling[c][1] = data[pos + 11 + 3 * c] & 15;
                if (sampling[c][0] < 1 || sampling[c][1] < 1)
                    return 0;
                h_max = sampling[c][0] > h_max ? sampling[c][0] : h_max;
                v_max = sampling[c][1] > v_max ? sampling[c][1] : v_max;
            }
        } else if (marker == 0xDD && length == 4) {
            restart_interval = (data[pos + 4] << 8) | data[pos + 5];
        } else if (marker == 0xDA) {
            if (components == 0 || restart_interval != 1 || length < 3 || data[pos + 4] != components)
                return 0;
            layout->scan_at = pos + 2 + length;
            break;
        }
        pos += 2 + length;
    }
    if (layout->scan_at == 0 || layout->height == 0 || layout->width == 0)
        return 0;
    /* a single-component scan's MCU is one block, whatever the sampling factors say */
    layout->mcu_width = components == 1 ? 8 : 8 * h_max;
    layout->mcu_height = components == 1 ? 8 : 8 * v_max;
    for (int c = 0; components > 1 && c < components; c++) {
        layout->fancy_across |= h_max == 2 * sampling[c][0];
        layout->fancy_down |= v_max == 2 * sampling[c][1];
    }
    return 1;
}

/* Offsets of the end of every MCU's data (the restart marker after it, or the end-of-image marker after the
 * last): `count` of them into `ends`. 0 when the scan does not hold exactly that many MCUs. */
static int find_mcu_ends(const unsigned char *data, size_t size, size_t scan_at, size_t count, size_t *ends)
{
    const unsigned char *at = data + scan_at, *last = data + size - 2; /* the end-of-image marker */
    size_t found = 0;
    while (at < last && (at = memchr(at, 0xFF, (size_t)(last - at))) != NULL) {
        if (at[1] >= 0xD0 && at[1] <= 0xD7) {
            if (found == count - 1)
                return 0; /* more restart markers than MCUs */
            ends[found++] = (size_t)(at - data);
        } else if (at[1] != 0x00) {
            return 0; /* a marker other than a restart within the scan: a second scan, or damage */
        }
        at += 2;
    }
    ends[found] = size - 2;
    return found == count - 1;
}

/* First and last MCU (column or row) whose pixels decode the span [start, start + length) exactly as in the
 * whole image: those it covers, and the neighbour before (after) where the span starts (ends) on an MCU
 * boundary and fancy upsampling reads a sample across it. `mcus` in the image, `mcu` pixels each. */
static void mcu_span(int start, int length, int mcu, int mcus, int fancy, int *first, int *last)
{
    *first = start / mcu - (fancy && start % mcu == 0);
    *last = (start + length - 1) / mcu + (fancy && (start + length) % mcu == 0);
    *first = *first < 0 ? 0 : *first;
    *last = *last > mcus - 1 ? mcus - 1 : *last;
}

/* Pixels that MCUs first..last span in an image `whole` pixels long: the last one may be partial. */
static int span_pixels(int first, int last, int mcu, int whole)
{
    return ((last + 1) * mcu < whole ? (last + 1) * mcu : whole) - first * mcu;
}

/* The box of an MCU-indexed file (laid out as `layout`), decoded from a small JPEG of the MCUs around it
 * into `out`. NULL on success, else the error message (in `trap`). Calls no Python API. */
static const char *decode_mcu_box(const unsigned char *data, size_t size, const McuLayout *layout,
                                  JDIMENSION top, JDIMENSION left, JDIMENSION height, JDIMENSION width,
                                  int channels, unsigned char *out, ErrorTrap *trap)
{
    int columns = (layout->width + layout->mcu_width - 1) / layout->mcu_width;
    int rows = (layout->height + layout->mcu_height - 1) / layout->mcu_height;
    int first_col, last_col, first_row, last_row, part_width, part_height, marker = 0;
    size_t count = (size_t)columns * rows, part_size = layout->scan_at, part_row_bytes;
    size_t *ends;
    unsigned char *part, *decoded;
    const char *error;

    if (left + width > (JDIMENSION)layout->width || top + height > (JDIMENSION)layout->height) {
        snprintf(trap->message, JMSG_LENGTH_MAX, "box %ux%u at (%u, %u) outside the %dx%d image", width,
                 height, left, top, layout->width, layout->height);
        return trap->message;
    }
    if (layout->scan_at + 2 > size || data[size - 2] != 0xFF || data[size - 1] != 0xD9) {
        snprintf(trap->message, JMSG_LENGTH_MAX, "no end-of-image marker after the scan");
        return trap->message;
    }
    if (count - 1 > (size - layout->scan_at) / 2) { /* each MCU but the last ends with a 2-byte marker */
        snprintf(trap->message, JMSG_LENGTH_MAX, "%zu MCUs cannot fit in %zu bytes", count, size);
        return trap->message;
    }
    ends = malloc(count * sizeof(size_t));
    part = malloc(size);
    if (ends == NULL || part == NULL) {
        free(ends);
        free(part);
        snprintf(trap->message, JMSG_LENGTH_MAX, "out of memory");
        return trap->message;
    }
    if (!find_mcu_ends(data, size, layout->scan_at, count, ends)) {
        free(ends);
        free(part);
        snprintf(trap->message, JMSG_LENGTH_MAX, "the scan does not hold %zu MCUs between restart markers",
                 count);
        return trap->message;
    }
    mcu_span(left, width, layout->mcu_width, columns, layout->fancy_across, &first_col, &last_col);
    mcu_span(top, height, layout->mcu_height, rows, layout->fancy_down, &first_row, &last_row);
    /* libjpeg upsamples a component at most 2 samples wide plainly (no fancy upsampling): a rectangle of
     * the image's last, narrow, MCU column alone takes the column before it too */
    while (layout->fancy_across && first_col > 0 &&
           span_pixels(first_col, last_col, layout->mcu_width, layout->width) <= 4)
        first_col--;
    part_width = span_pixels(first_col, last_col, layout->mcu_width, layout->width);
    part_height = span_pixels(first_row, last_row, layout->mcu_height, layout->height);

    /* the small JPEG: the headers with the rectangle's size, its MCUs row by row, renumbered markers */
    memcpy(part, data, layout->scan_at);
    part[layout->frame_size_at] = (unsigned char)(part_height >> 8);
    part[layout->frame_size_at + 1] = (unsigned char)part_height;
    part[layout->frame_size_at + 2] = (unsigned char)(part_width >> 8);
    part[layout->frame_size_at + 3] = (unsigned char)part_width;
    for (int row = first_row; row <= last_row; row++) {
        size_t first = (size_t)row * columns + first_col, last = (size_t)row * columns + last_col;
        size_t start = first == 0 ? layout->scan_at : ends[first - 1] + 2, stop = ends[last] + 2;
        memcpy(part + part_size, data + start, stop - start); /* its MCUs, each with the marker after it */
        for (size_t mcu = first; mcu <= last; mcu++)
            part[part_size + ends[mcu] - start + 1] = (unsigned char)(0xD0 + (marker++ & 7));
        part_size += stop - start;
    }
    part[part_size - 1] = 0xD9; /* the last MCU's marker becomes the end of image */
    free(ends);

    /* decoded at the rectangle's full width (no column crop of the small image), then cut */
    part_row_bytes = (size_t)part_width * channels;
    decoded = malloc(part_row_bytes * height);
    if (decoded == NULL) {
        free(part);
        snprintf(trap->message, JMSG_LENGTH_MAX, "out of memory");
        return trap->message;
    }
    error = decode_box(part, part_size, top - first_row * layout->mcu_height, 0, height, part_width, 1,
                       channels, decoded, trap);
    for (JDIMENSION r = 0; error == NULL && r < height; r++)
        memcpy(out + (size_t)r * width * channels,
               decoded + r * part_row_bytes + (size_t)(left - first_col * layout->mcu_width) * channels,
               (size_t)width * channels);
    free(decoded);
    free(part);
    return error;
}

/* The file re-encoded losslessly (its DCT coefficients copied, Huffman tables optimized) with a restart
 * marker after every MCU, its APPn and COM markers (EXIF, ICC profile) kept; into `*out` (malloc'ed by
 * libjpeg). NULL on success, else the error message (in `trap`). Calls no Python API. */
static const char *transcode(const unsigned char *data, unsigned long size, unsigned char **out,
                             unsigned long *out_size, ErrorTrap *trap)
{
    struct jpeg_decompress_struct source;
    struct jpeg_compress_struct target;
    jvirt_barray_ptr *coefficients;
    jpeg_saved_marker_ptr saved;
    int m;

    memset(&source, 0, sizeof(source)); /* destroying a zeroed object is a no-op: safe before its creation */
    memset(&target, 0, sizeof(target));
    /* one error manager for both: they are used one after the other, and an error in either ends both */
    source.err = target.err = jpeg_std_error(&trap->base);
    trap->base.error_exit = escape_on_error;
    trap->base.emit_message = escape_on_warning;
    if (setjmp(trap->escape)) {
        jpeg_destroy_compress(&target);
        jpeg_destroy_decompress(&source);
        return trap->message;
    }
    jpeg_create_decompress(&source);
    jpeg_create_compress(&target);
    jpeg_mem_src(&source, data, size);
    jpeg_save_markers(&source, JPEG_COM, 0xFFFF);
    for (m = 0; m < 16; m++)
        jpeg_save_markers(&source, JPEG_APP0 + m, 0xFFFF);
    jpeg_read_header(&source, TRUE);
    coefficients = jpeg_read_coefficients(&source);
    jpeg_copy_critical_parameters(&source, &target);
    target.restart_interval = 1;
    target.optimize_coding = TRUE; /* smaller than the original despite the markers, and faster to decode */
    jpeg_mem_dest(&target, out, out_size);
    jpeg_write_coefficients(&target, coefficients);
    for (saved = source.marker_list; saved != NULL; saved = saved->next) {
        int jfif = saved->marker == JPEG_APP0 && saved->data_length >= 5 && !memcmp(saved->data, "JFIF", 5);
        int adobe = saved->marker == JPEG_APP0 + 14 && saved->data_length >= 5 && !memcmp(saved->data, "Adobe", 5);
        if ((jfif && target.write_JFIF_header) || (adobe && target.write_Adobe_marker))
            continue; /* libjpeg writes its own */
        jpeg_write_marker(&target, saved->marker, saved->data, saved->data_length);
    }
    jpeg_finish_compress(&target);
    jpeg_finish_decompress(&source);
    jpeg_destroy_compress(&target);
    jpeg_destroy_decompress(&source);
    return NULL;
}

static PyObject *decode_region(PyObject *module, PyObject *args)
{
    Py_buffer data;
    int top, left, height, width, scale_denom, channels;
    ErrorTrap trap;
    McuLayout layout;
    const char *error;
    PyObject *out;

    if (!PyArg_ParseTuple(args, "y*iiiiii", &data, &top, &left, &height, &width, &scale_denom, &channels))
        return NULL;
    if (top < 0 || left < 0 || height <= 0 || width <= 0 || (channels != 1 && channels != 3) ||
        (scale_denom != 1 && scale_denom != 2 && scale_denom != 4 && scale_denom != 8)) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "bad box %dx%d at (%d, %d), scale 1/%d or %d channels", width,
                            height, left, top, scale_denom, channels);
    }
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)height * width * channels);
    if (out == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (scale_denom == 1 && read_mcu_layout(data.buf, (size_t)data.len, &layout))
        error = decode_mcu_box(data.buf, (size_t)data.len, &layout, top, left, height, width, channels,
                               (unsigned char *)PyByteArray_AS_STRING(out), &trap);
    else
        error = decode_box(data.buf, (unsigned long)data.len, top, left, height, width, scale_denom, channels,
                           (unsigned char *)PyByteArray_AS_STRING(out), &trap);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (error != NULL) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_ValueError, "JPEG region decode: %s", error);
    }
    return out;
}

static PyObject *transcode_restart_every_mcu(PyObject *module, PyObject *args)
{
    Py_buffer data;
    ErrorTrap trap;
    unsigned char *encoded = NULL;
    unsigned long encoded_size = 0;
    const char *error;
    PyObject *out = NULL;

    if (!PyArg_ParseTuple(args, "y*", &data))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    error = transcode(data.buf, (unsigned long)data.len, &encoded, &encoded_size, &trap);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (error != NULL)
        PyErr_Format(PyExc_ValueError, "JPEG transcode: %s", error);
    else
        out = PyBytes_FromStringAndSize((const char *)encoded, (Py_ssize_t)encoded_size);
    free(encoded);
    return out;
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, top, left, height, width, scale_denom, channels) -> bytearray\n\n"
     "The box's pixels, row-major [height, width, channels], of the JPEG decoded at 1/scale_denom;\n"
     "only the rows and iMCU columns the box covers are decoded (in a file with a restart marker after\n"
     "every MCU, at full size: only the MCUs around the box). ValueError on a bad file."},
    {"transcode_restart_every_mcu", transcode_restart_every_mcu, METH_VARARGS,
     "transcode_restart_every_mcu(data) -> bytes\n\n"
     "The sequential JPEG re-encoded losslessly with a restart marker after every MCU (Huffman tables\n"
     "optimized, APPn and COM markers kept). ValueError on a bad file."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region",
                                    "Region decoding of sequential JPEGs (libjpeg-turbo).", -1, methods};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
