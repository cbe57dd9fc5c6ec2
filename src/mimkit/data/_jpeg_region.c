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
 * Python: decode_region(data, top, left, height, width, scale_denom, channels) -> bytearray of
 * height * width * channels bytes, row-major `[height, width, channels]`; the box is in the frame of the
 * image decoded at 1/scale_denom (libjpeg's DCT scaling), channels 1 (grey) or 3 (RGB).
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

static PyObject *decode_region(PyObject *module, PyObject *args)
{
    Py_buffer data;
    int top, left, height, width, scale_denom, channels;
    ErrorTrap trap;
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

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, top, left, height, width, scale_denom, channels) -> bytearray\n\n"
     "The box's pixels, row-major [height, width, channels], of the JPEG decoded at 1/scale_denom;\n"
     "only the rows and iMCU columns the box covers are decoded. ValueError on a bad file."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region",
                                    "Region decoding of sequential JPEGs (libjpeg-turbo).", -1, methods};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
