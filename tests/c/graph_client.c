/*
 * Stream capture and CUDA graphs through the driver API: captures a chain
 * of launches, memsets and copies (with a fork/join onto a second stream),
 * instantiates it, launches it several times and checks the data every
 * launch produces; then checks the error codes of capture misuse, and the
 * stream-priority and cuLaunchKernelEx entry points.
 *
 * Env: VGPU_EXPECT_EXECUTION=1|0  whether kernels really run (default: yes,
 *      unless the device name says it is emulated). When they do not, the
 *      data checks cover only what copies and memsets produce.
 *
 * Prints one PASS/FAIL line per check and exits non-zero on any failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define WORDS 4096u
#define BYTES (WORDS * 4u)
#define CHAIN 50u
#define LAUNCHES 5u

/* step: y[i] = y[i] * mul + add for i < n (32-bit wrap-around). */
static const char STEP_PTX[] =
    ".version 7.0\n"
    ".target sm_75\n"
    ".address_size 64\n"
    "\n"
    ".visible .entry step(\n"
    "    .param .u32 step_n,\n"
    "    .param .u32 step_mul,\n"
    "    .param .u32 step_add,\n"
    "    .param .u64 step_y\n"
    ")\n"
    "{\n"
    "    .reg .pred %p<2>;\n"
    "    .reg .b32 %r<10>;\n"
    "    .reg .b64 %rd<5>;\n"
    "\n"
    "    ld.param.u32 %r1, [step_n];\n"
    "    ld.param.u32 %r2, [step_mul];\n"
    "    ld.param.u32 %r3, [step_add];\n"
    "    ld.param.u64 %rd1, [step_y];\n"
    "    mov.u32 %r4, %ctaid.x;\n"
    "    mov.u32 %r5, %ntid.x;\n"
    "    mov.u32 %r6, %tid.x;\n"
    "    mad.lo.s32 %r7, %r4, %r5, %r6;\n"
    "    setp.ge.u32 %p1, %r7, %r1;\n"
    "    @%p1 bra DONE;\n"
    "    cvta.to.global.u64 %rd2, %rd1;\n"
    "    mul.wide.u32 %rd3, %r7, 4;\n"
    "    add.s64 %rd4, %rd2, %rd3;\n"
    "    ld.global.u32 %r8, [%rd4];\n"
    "    mad.lo.s32 %r9, %r8, %r2, %r3;\n"
    "    st.global.u32 [%rd4], %r9;\n"
    "DONE:\n"
    "    ret;\n"
    "}\n";

static int g_exec = 0;
static CUfunction g_step;
static CUdeviceptr g_a, g_b, g_c;
static uint32_t *g_src, *g_dst; /* pinned */
static uint32_t *g_page;        /* pageable */

static int expect_execution(const char *device_name) {
    const char *env = getenv("VGPU_EXPECT_EXECUTION");
    if (env != NULL && *env != '\0') {
        return strcmp(env, "0") != 0;
    }
    return strstr(device_name, "mulated") == NULL;
}

/* The add operand of chain step k (the last one is cuLaunchKernelEx's). */
static uint32_t add_of(unsigned k) { return 1000u + k; }

/* What the graph computes from `src` word i. */
static uint32_t expected_word(uint32_t v) {
    if (!g_exec) {
        return v;
    }
    for (unsigned k = 0; k <= CHAIN; k++) {
        v = v * 3u + add_of(k);
    }
    return v;
}

static void check_result(const uint32_t *got, const char *what) {
    for (unsigned i = 0; i < WORDS; i++) {
        uint32_t want = expected_word(g_src[i]);
        if (got[i] != want) {
            fail(what, "word %u is 0x%08x, expected 0x%08x", i, got[i], want);
            return;
        }
    }
    pass(what);
}

static CUresult launch_step(CUstream s, uint32_t *mul, uint32_t *add) {
    unsigned n = WORDS;
    void *params[] = {&n, mul, add, &g_a};
    return cuLaunchKernel(g_step, WORDS / 256, 1, 1, 256, 1, 1, 0, s, params, NULL);
}

static void test_priorities(void) {
    int least = 99, greatest = 99, p = 99;
    check_rc(cuCtxGetStreamPriorityRange(&least, &greatest), CUDA_SUCCESS,
             "cuCtxGetStreamPriorityRange");
    check(least == 0 && greatest == -5, "priority range is 0..-5", "got %d..%d", least,
          greatest);
    check_rc(cuCtxGetStreamPriorityRange(NULL, &greatest), CUDA_SUCCESS,
             "cuCtxGetStreamPriorityRange accepts NULL");
    int asked[3] = {-3, -100, 5}, want[3] = {-3, -5, 0};
    for (int i = 0; i < 3; i++) {
        CUstream s = NULL;
        check_rc(cuStreamCreateWithPriority(&s, CU_STREAM_NON_BLOCKING, asked[i]), CUDA_SUCCESS,
                 "cuStreamCreateWithPriority");
        check_rc(cuStreamGetPriority(s, &p), CUDA_SUCCESS, "cuStreamGetPriority");
        check(p == want[i], "stream priority is clamped into the range", "asked %d, got %d",
              asked[i], p);
        cuStreamDestroy(s);
    }
    check_rc(cuStreamGetPriority(NULL, &p), CUDA_SUCCESS, "cuStreamGetPriority(default)");
    check(p == 0, "the default stream has priority 0", "got %d", p);
}

/* Captures the main graph on s (forking onto s2); returns it. */
static CUgraph capture_main(CUstream s, CUstream s2, CUevent fork, CUevent join) {
    CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
    cuuint64_t id = 0, id2 = 0;
    CUgraph g = NULL;
    const CUgraphNode *deps = NULL;
    const CUgraphEdgeData *edges = NULL;
    size_t ndeps = 99;

    check_rc(cuStreamIsCapturing(s, &st), CUDA_SUCCESS, "cuStreamIsCapturing before");
    check(st == CU_STREAM_CAPTURE_STATUS_NONE, "not capturing before begin", "status %d", st);
    require_rc(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL), "cuStreamBeginCapture");
    check_rc(cuStreamIsCapturing(s, &st), CUDA_SUCCESS, "cuStreamIsCapturing during");
    check(st == CU_STREAM_CAPTURE_STATUS_ACTIVE, "capturing after begin", "status %d", st);
    check_rc(cuStreamGetCaptureInfo(s, &st, &id, &g, &deps, &edges, &ndeps), CUDA_SUCCESS,
             "cuStreamGetCaptureInfo (v3)");
    check(id != 0 && g != NULL && ndeps == 0, "capture info: id, graph, no dependencies yet",
          "id %llu graph %p deps %zu", id, (void *)g, ndeps);

    check_rc(cuMemsetD32Async(g_a, 0, WORDS, s), CUDA_SUCCESS, "captured memset");
    check_rc(cuMemcpyHtoDAsync(g_a, g_src, BYTES, s), CUDA_SUCCESS, "captured HtoD (pinned)");
    check_rc(cuStreamGetCaptureInfo_v2(s, &st, &id2, NULL, &deps, &ndeps), CUDA_SUCCESS,
             "cuStreamGetCaptureInfo_v2");
    check(id2 == id && ndeps == 1 && deps != NULL && deps[0] != NULL,
          "the stream depends on its last captured node", "id %llu deps %zu", id2, ndeps);

    /* The chain: parameters are copied at capture, so changing them after
     * each call must not change what the graph runs. */
    int ok = 1;
    for (unsigned k = 0; k < CHAIN; k++) {
        uint32_t mul = 3, add = add_of(k);
        ok &= launch_step(s, &mul, &add) == CUDA_SUCCESS;
        mul = 0xdead;
        add = 0xbeef;
    }
    check(ok, "50 captured launches", "a launch failed");
    {
        unsigned n = WORDS;
        uint32_t mul = 3, add = add_of(CHAIN);
        void *params[] = {&n, &mul, &add, &g_a};
        CUlaunchAttribute attr;
        memset(&attr, 0, sizeof attr);
        attr.id = CU_LAUNCH_ATTRIBUTE_PRIORITY;
        attr.value.priority = -2;
        CUlaunchConfig cfg = {WORDS / 256, 1, 1, 256, 1, 1, 0, s, &attr, 1};
        check_rc(cuLaunchKernelEx(&cfg, g_step, params, NULL), CUDA_SUCCESS,
                 "captured cuLaunchKernelEx with a priority attribute");
        mul = 0;
    }

    /* Fork onto s2, copy there, join back. */
    check_rc(cuEventRecord(fork, s), CUDA_SUCCESS, "captured event record (fork)");
    check_rc(cuStreamWaitEvent(s2, fork, 0), CUDA_SUCCESS, "s2 waits on the fork event");
    check_rc(cuStreamIsCapturing(s2, &st), CUDA_SUCCESS, "cuStreamIsCapturing(s2)");
    check(st == CU_STREAM_CAPTURE_STATUS_ACTIVE, "the forked stream is capturing", "status %d",
          st);
    check_rc(cuMemcpyDtoDAsync(g_c, g_a, BYTES, s2), CUDA_SUCCESS, "captured DtoD on s2");
    check_rc(cuEventRecord(join, s2), CUDA_SUCCESS, "captured event record (join)");
    check_rc(cuStreamWaitEvent(s, join, 0), CUDA_SUCCESS, "s waits on the join event");

    check_rc(cuMemcpyDtoDAsync(g_b, g_c, BYTES, s), CUDA_SUCCESS, "captured DtoD on s");
    check_rc(cuMemcpyDtoHAsync(g_dst, g_b, BYTES, s), CUDA_SUCCESS, "captured DtoH (pinned)");
    check_rc(cuMemcpyDtoHAsync(g_page, g_c, BYTES, s), CUDA_SUCCESS, "captured DtoH (pageable)");

    CUgraph graph = NULL;
    require_rc(cuStreamEndCapture(s, &graph), "cuStreamEndCapture");
    check(graph == g, "the graph is the one capture info named", "%p vs %p", (void *)graph,
          (void *)g);
    check_rc(cuStreamIsCapturing(s, &st), CUDA_SUCCESS, "cuStreamIsCapturing after");
    check(st == CU_STREAM_CAPTURE_STATUS_NONE, "not capturing after end", "status %d", st);
    check_rc(cuStreamIsCapturing(s2, &st), CUDA_SUCCESS, "cuStreamIsCapturing(s2) after");
    check(st == CU_STREAM_CAPTURE_STATUS_NONE, "the forked stream left the capture", "status %d",
          st);
    return graph;
}

static void run_graph(CUgraphExec exec, CUstream s, uint32_t seed, const char *what) {
    char label[160];
    fill_pattern(g_src, BYTES, seed);
    memset(g_dst, 0, BYTES);
    memset(g_page, 0, BYTES);
    snprintf(label, sizeof label, "cuGraphLaunch %s", what);
    check_rc(cuGraphLaunch(exec, s), CUDA_SUCCESS, label);
    snprintf(label, sizeof label, "cuStreamSynchronize after %s", what);
    check_rc(cuStreamSynchronize(s), CUDA_SUCCESS, label);
    snprintf(label, sizeof label, "%s: pinned DtoH holds this launch's data", what);
    check_result(g_dst, label);
    snprintf(label, sizeof label, "%s: pageable DtoH holds this launch's data", what);
    check_result(g_page, label);
}

static void test_graph(CUstream s, CUstream s2) {
    CUevent fork, join;
    require_rc(cuEventCreate(&fork, CU_EVENT_DISABLE_TIMING), "cuEventCreate(fork)");
    require_rc(cuEventCreate(&join, CU_EVENT_DISABLE_TIMING), "cuEventCreate(join)");

    /* Known contents, to show capture ran nothing. */
    uint32_t *probe = malloc(BYTES);
    fill_pattern(probe, BYTES, 0xabcd0001u);
    require_rc(cuMemcpyHtoD(g_a, probe, BYTES), "prefill a");
    fill_pattern(g_src, BYTES, 0x11110000u);

    CUgraph graph = capture_main(s, s2, fork, join);
    memset(probe, 0, BYTES);
    check_rc(cuMemcpyDtoH(probe, g_a, BYTES), CUDA_SUCCESS, "read a after capture");
    check(find_pattern_mismatch(probe, BYTES, 0xabcd0001u) < 0,
          "capture recorded the work instead of running it", "a changed");
    free(probe);

    size_t count = 0;
    check_rc(cuGraphGetNodes(graph, NULL, &count), CUDA_SUCCESS, "cuGraphGetNodes(count)");
    check(count == CHAIN + 7, "the graph has every captured node", "%zu nodes", count);
    CUgraphNode nodes[4] = {NULL, NULL, NULL, NULL};
    size_t room = 4;
    check_rc(cuGraphGetNodes(graph, nodes, &room), CUDA_SUCCESS, "cuGraphGetNodes(4)");
    check(room == 4 && nodes[0] != NULL && nodes[3] != NULL && nodes[0] != nodes[1],
          "cuGraphGetNodes fills the room given", "%zu", room);

    CUgraphExec exec = NULL;
    require_rc(cuGraphInstantiate(&exec, graph, 0), "cuGraphInstantiate");
    check_rc(cuGraphUpload(exec, s), CUDA_SUCCESS, "cuGraphUpload");
    for (unsigned i = 0; i < LAUNCHES; i++) {
        char what[64];
        snprintf(what, sizeof what, "launch %u", i);
        run_graph(exec, s, 0x5eed0000u + i, what);
    }
    run_graph(exec, s2, 0x5eed0100u, "on another stream");

    /* Back-to-back launches, one sync. */
    fill_pattern(g_src, BYTES, 0x5eed0200u);
    int ok = 1;
    for (unsigned i = 0; i < 3; i++) {
        ok &= cuGraphLaunch(exec, s) == CUDA_SUCCESS;
    }
    check(ok, "three launches without waiting", "a launch failed");
    check_rc(cuStreamSynchronize(s), CUDA_SUCCESS, "sync after three launches");
    check_result(g_dst, "back-to-back launches produce the data");

    /* The instantiated graph is independent of the graph. */
    CUgraphExec exec2 = NULL;
    check_rc(cuGraphInstantiate_v2(&exec2, graph, NULL, NULL, 0), CUDA_SUCCESS,
             "cuGraphInstantiate_v2 (5-argument ABI)");
    check_rc(cuGraphDestroy(graph), CUDA_SUCCESS, "cuGraphDestroy");
    run_graph(exec2, s, 0x5eed0300u, "after its graph was destroyed");

    /* A graph launched into a capture becomes part of the new graph. */
    CUgraph outer = NULL;
    check_rc(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL), CUDA_SUCCESS,
             "begin a capture around a graph launch");
    check_rc(cuGraphLaunch(exec, s), CUDA_SUCCESS, "captured cuGraphLaunch");
    check_rc(cuStreamEndCapture(s, &outer), CUDA_SUCCESS, "end it");
    count = 0;
    check_rc(cuGraphGetNodes(outer, NULL, &count), CUDA_SUCCESS, "cuGraphGetNodes(outer)");
    check(count == CHAIN + 7, "the launched graph's nodes are in the outer graph", "%zu", count);
    CUgraphExec outer_exec = NULL;
    check_rc(cuGraphInstantiate(&outer_exec, outer, 0), CUDA_SUCCESS, "instantiate outer");
    run_graph(outer_exec, s, 0x5eed0400u, "of a graph holding a graph");

    check_rc(cuGraphExecDestroy(outer_exec), CUDA_SUCCESS, "cuGraphExecDestroy(outer)");
    check_rc(cuGraphDestroy(outer), CUDA_SUCCESS, "cuGraphDestroy(outer)");
    check_rc(cuGraphExecDestroy(exec2), CUDA_SUCCESS, "cuGraphExecDestroy(v2)");
    check_rc(cuGraphExecDestroy(exec), CUDA_SUCCESS, "cuGraphExecDestroy");
    check_rc(cuGraphExecDestroy(exec), CUDA_ERROR_INVALID_HANDLE,
             "cuGraphExecDestroy twice is INVALID_HANDLE");
    check_rc(cuGraphLaunch(exec, s), CUDA_ERROR_INVALID_HANDLE,
             "cuGraphLaunch of a destroyed exec is INVALID_HANDLE");
    cuEventDestroy(fork);
    cuEventDestroy(join);
}

static void test_empty_graph(CUstream s) {
    CUgraph g = NULL;
    CUgraphExec e = NULL;
    size_t count = 99;
    check_rc(cuGraphCreate(&g, 1), CUDA_ERROR_INVALID_VALUE, "cuGraphCreate flags 1");
    require_rc(cuGraphCreate(&g, 0), "cuGraphCreate");
    check_rc(cuGraphGetNodes(g, NULL, &count), CUDA_SUCCESS, "cuGraphGetNodes(empty)");
    check(count == 0, "a new graph is empty", "%zu nodes", count);
    check_rc(cuGraphInstantiate(&e, g, 0), CUDA_SUCCESS, "instantiate an empty graph");
    check_rc(cuGraphLaunch(e, s), CUDA_SUCCESS, "launch an empty graph");
    check_rc(cuStreamSynchronize(s), CUDA_SUCCESS, "sync after the empty graph");
    check_rc(cuGraphInstantiate(&e, g, 4), CUDA_ERROR_NOT_SUPPORTED,
             "device-launch instantiation is NOT_SUPPORTED");
    check_rc(cuGraphExecDestroy(e), CUDA_SUCCESS, "destroy the empty exec");
    check_rc(cuGraphDestroy(g), CUDA_SUCCESS, "destroy the empty graph");
    check_rc(cuGraphDestroy(g), CUDA_ERROR_INVALID_HANDLE, "cuGraphDestroy twice");
}

/* Ends the capture on s, expecting `want`; a failed end returns no graph. */
static void end_expect(CUstream s, CUresult want, const char *what) {
    CUgraph g = (CUgraph)0x1;
    CUresult rc = cuStreamEndCapture(s, &g);
    check_rc(rc, want, what);
    if (want == CUDA_SUCCESS) {
        cuGraphDestroy(g);
    } else {
        check(g == NULL, "a failed capture returns no graph", "got %p", (void *)g);
    }
}

static void test_capture_errors(CUstream s, CUstream s2, CUstream blocking) {
    CUstreamCaptureStatus st;
    CUgraph g = NULL;
    CUevent ev, plain;
    require_rc(cuEventCreate(&ev, CU_EVENT_DISABLE_TIMING), "cuEventCreate(ev)");
    require_rc(cuEventCreate(&plain, CU_EVENT_DISABLE_TIMING), "cuEventCreate(plain)");

    check_rc(cuStreamBeginCapture(NULL, CU_STREAM_CAPTURE_MODE_GLOBAL),
             CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "capturing the legacy stream");
    check_rc(cuStreamEndCapture(s, &g), CUDA_ERROR_ILLEGAL_STATE,
             "ending a capture never begun is ILLEGAL_STATE");
    check_rc(cuStreamBeginCapture(s, (CUstreamCaptureMode)7), CUDA_ERROR_INVALID_VALUE,
             "an unknown capture mode");

    check_rc(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL), CUDA_SUCCESS, "begin");
    check_rc(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL), CUDA_ERROR_ILLEGAL_STATE,
             "beginning twice is ILLEGAL_STATE");
    end_expect(s, CUDA_SUCCESS, "an empty capture ends");

    /* Synchronizing the capturing stream invalidates the capture. */
    cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL);
    check_rc(cuStreamSynchronize(s), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
             "cuStreamSynchronize on a capturing stream");
    check_rc(cuMemsetD32Async(g_a, 1, WORDS, s), CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
             "work after an invalidating call");
    check_rc(cuStreamIsCapturing(s, &st), CUDA_SUCCESS, "cuStreamIsCapturing(invalidated)");
    check(st == CU_STREAM_CAPTURE_STATUS_INVALIDATED, "status is INVALIDATED", "status %d", st);
    end_expect(s, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "ending an invalidated capture");
    check_rc(cuStreamIsCapturing(s, &st), CUDA_SUCCESS, "cuStreamIsCapturing after");
    check(st == CU_STREAM_CAPTURE_STATUS_NONE, "the stream is free again", "status %d", st);

    /* Global mode forbids unsafe calls; relaxed allows them. */
    CUdeviceptr p = 0;
    cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL);
    check_rc(cuMemAlloc(&p, 4096), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
             "cuMemAlloc during a global capture");
    end_expect(s, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "the refused call invalidated it");

    cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL);
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    check_rc(cuThreadExchangeStreamCaptureMode(&mode), CUDA_SUCCESS,
             "cuThreadExchangeStreamCaptureMode(RELAXED)");
    check(mode == CU_STREAM_CAPTURE_MODE_GLOBAL, "the old mode was GLOBAL", "mode %d", mode);
    check_rc(cuMemAlloc(&p, 4096), CUDA_SUCCESS, "cuMemAlloc in relaxed mode");
    check_rc(cuMemFree(p), CUDA_SUCCESS, "cuMemFree in relaxed mode");
    check_rc(cuThreadExchangeStreamCaptureMode(&mode), CUDA_SUCCESS, "restore the mode");
    check(mode == CU_STREAM_CAPTURE_MODE_RELAXED, "the exchanged mode comes back", "%d", mode);
    end_expect(s, CUDA_SUCCESS, "the capture survived relaxed calls");
    mode = (CUstreamCaptureMode)9;
    check_rc(cuThreadExchangeStreamCaptureMode(&mode), CUDA_ERROR_INVALID_VALUE,
             "an unknown mode is INVALID_VALUE");

    cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED);
    check_rc(cuCtxSynchronize(), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
             "cuCtxSynchronize during a capture");
    end_expect(s, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "after cuCtxSynchronize");

    /* Forks must be joined, and only the origin ends the capture. */
    cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL);
    cuEventRecord(ev, s);
    cuStreamWaitEvent(s2, ev, 0);
    check_rc(cuMemsetD32Async(g_c, 7, WORDS, s2), CUDA_SUCCESS, "work on the fork");
    end_expect(s, CUDA_ERROR_STREAM_CAPTURE_UNJOINED, "ending with an unjoined fork");
    check_rc(cuStreamIsCapturing(s2, &st), CUDA_SUCCESS, "cuStreamIsCapturing(fork)");
    check(st == CU_STREAM_CAPTURE_STATUS_NONE, "the fork left the capture", "status %d", st);

    cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL);
    cuEventRecord(ev, s);
    cuStreamWaitEvent(s2, ev, 0);
    check_rc(cuStreamEndCapture(s2, &g), CUDA_ERROR_STREAM_CAPTURE_UNMATCHED,
             "ending on a forked stream is UNMATCHED");
    end_expect(s, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "after UNMATCHED");

    /* Captured events cannot be waited for by the host. */
    cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED);
    cuEventRecord(ev, s);
    check_rc(cuEventQuery(ev), CUDA_ERROR_CAPTURED_EVENT, "cuEventQuery on a captured event");
    end_expect(s, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "after querying a captured event");

    /* Waiting on an event from outside needs CU_EVENT_WAIT_EXTERNAL. */
    check_rc(cuEventRecord(plain, s), CUDA_SUCCESS, "record an event outside capture");
    cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL);
    check_rc(cuStreamWaitEvent(s, plain, 0), CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
             "waiting on an outside event is ISOLATION");
    end_expect(s, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "after ISOLATION");
    cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL);
    check_rc(cuStreamWaitEvent(s, plain, CU_EVENT_WAIT_EXTERNAL), CUDA_SUCCESS,
             "an external wait is captured");
    check_rc(cuStreamEndCapture(s, &g), CUDA_SUCCESS, "end with an external wait");
    size_t count = 0;
    cuGraphGetNodes(g, NULL, &count);
    check(count == 1, "the external wait is a node", "%zu nodes", count);
    CUgraphExec e = NULL;
    check_rc(cuGraphInstantiate(&e, g, 0), CUDA_SUCCESS, "instantiate the wait graph");
    check_rc(cuGraphLaunch(e, s), CUDA_SUCCESS, "launch the wait graph");
    check_rc(cuStreamSynchronize(s), CUDA_SUCCESS, "the wait graph completes");
    cuGraphExecDestroy(e);
    cuGraphDestroy(g);

    /* The legacy stream and a capturing blocking stream. */
    cuStreamBeginCapture(blocking, CU_STREAM_CAPTURE_MODE_RELAXED);
    check_rc(cuStreamIsCapturing(NULL, &st), CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
             "cuStreamIsCapturing(legacy) while a blocking stream captures");
    end_expect(blocking, CUDA_SUCCESS, "that query did not invalidate the capture");
    cuStreamBeginCapture(blocking, CU_STREAM_CAPTURE_MODE_RELAXED);
    check_rc(cuMemsetD32Async(g_a, 1, WORDS, NULL), CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
             "legacy-stream work while a blocking stream captures");
    end_expect(blocking, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "after IMPLICIT");
    cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED);
    check_rc(cuMemsetD32Async(g_b, 1, WORDS, NULL), CUDA_SUCCESS,
             "legacy-stream work while a non-blocking stream captures");
    end_expect(s, CUDA_SUCCESS, "that work did not touch the capture");
    check_rc(cuStreamSynchronize(NULL), CUDA_SUCCESS, "legacy stream sync after captures");

    cuEventDestroy(ev);
    cuEventDestroy(plain);
}

static void test_launch_ex(CUstream s) {
    unsigned n = WORDS;
    uint32_t mul = 1, add = 0;
    void *params[] = {&n, &mul, &add, &g_a};
    CUlaunchAttribute attr;
    CUlaunchConfig cfg = {WORDS / 256, 1, 1, 256, 1, 1, 0, s, &attr, 1};

    memset(&attr, 0, sizeof attr);
    attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    check_rc(cuLaunchKernelEx(&cfg, g_step, params, NULL), CUDA_SUCCESS,
             "cuLaunchKernelEx with a hint attribute");
    cfg.numAttrs = 0;
    check_rc(cuLaunchKernelEx(&cfg, g_step, params, NULL), CUDA_SUCCESS,
             "cuLaunchKernelEx without attributes");
    cfg.numAttrs = 1;
    memset(&attr, 0, sizeof attr);
    attr.id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attr.value.cooperative = 1;
    check_rc(cuLaunchKernelEx(&cfg, g_step, params, NULL), CUDA_SUCCESS,
             "cooperative cuLaunchKernelEx is launched");
    memset(&attr, 0, sizeof attr);
    attr.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = 2;
    attr.value.clusterDim.y = 1;
    attr.value.clusterDim.z = 1;
    check_rc(cuLaunchKernelEx(&cfg, g_step, params, NULL), CUDA_SUCCESS,
             "cluster cuLaunchKernelEx is sent with its cluster dimensions");
    memset(&attr, 0, sizeof attr);
    attr.id = (CUlaunchAttributeID)99;
    check_rc(cuLaunchKernelEx(&cfg, g_step, params, NULL), CUDA_ERROR_INVALID_VALUE,
             "an unknown launch attribute is INVALID_VALUE");
    cfg.numAttrs = 0;
    cfg.blockDimX = 0;
    check_rc(cuLaunchKernelEx(&cfg, g_step, params, NULL), CUDA_ERROR_INVALID_VALUE,
             "cuLaunchKernelEx with a zero block is INVALID_VALUE");
    check_rc(cuStreamSynchronize(s), CUDA_SUCCESS, "sync after cuLaunchKernelEx");
}

int main(void) {
    start_watchdog(120);
    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    char name[256] = {0};
    require_rc(cuInit(0), "cuInit");
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    cuDeviceGetName(name, sizeof name, dev);
    g_exec = expect_execution(name);
    printf("INFO device \"%s\", kernels %s\n", name, g_exec ? "execute" : "are validated only");
    require_rc(cuCtxCreate(&ctx, 0, dev), "cuCtxCreate");
    require_rc(cuModuleLoadData(&mod, STEP_PTX), "cuModuleLoadData");
    require_rc(cuModuleGetFunction(&g_step, mod, "step"), "cuModuleGetFunction(step)");
    require_rc(cuMemAlloc(&g_a, BYTES), "cuMemAlloc(a)");
    require_rc(cuMemAlloc(&g_b, BYTES), "cuMemAlloc(b)");
    require_rc(cuMemAlloc(&g_c, BYTES), "cuMemAlloc(c)");
    require_rc(cuMemAllocHost((void **)&g_src, BYTES), "cuMemAllocHost(src)");
    require_rc(cuMemAllocHost((void **)&g_dst, BYTES), "cuMemAllocHost(dst)");
    g_page = malloc(BYTES);

    CUstream s, s2, blocking;
    require_rc(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), "cuStreamCreate(s)");
    require_rc(cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING), "cuStreamCreate(s2)");
    require_rc(cuStreamCreate(&blocking, CU_STREAM_DEFAULT), "cuStreamCreate(blocking)");

    test_priorities();
    test_graph(s, s2);
    test_empty_graph(s);
    test_capture_errors(s, s2, blocking);
    test_launch_ex(s);

    check_rc(cuCtxSynchronize(), CUDA_SUCCESS, "cuCtxSynchronize at the end");
    cuStreamDestroy(s);
    cuStreamDestroy(s2);
    cuStreamDestroy(blocking);
    cuMemFreeHost(g_src);
    cuMemFreeHost(g_dst);
    free(g_page);
    cuMemFree(g_a);
    cuMemFree(g_b);
    cuMemFree(g_c);
    cuModuleUnload(mod);
    check_rc(cuCtxDestroy(ctx), CUDA_SUCCESS, "cuCtxDestroy");
    finish();
    return 0;
}
