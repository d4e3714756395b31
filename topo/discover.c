/*
 * discover.c - local discovery with hwloc, sysfs and (when present) the CUDA
 * driver and NVML loaded at run time. See discover.h for the contract.
 */
#define _POSIX_C_SOURCE 200809L

#include "discover.h"

#include <ctype.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <hwloc.h>

#include "common/units.h"

#define GiB (1024.0 * 1024.0 * 1024.0)
#define MiB (1024.0 * 1024.0)

/* Estimates for the `cpu` pseudo-device (see estimate_cpu_type). */
#define CPU_DEFAULT_HZ 2.5e9          /* when no clock can be read */
#define CPU_FLOP_PER_CYCLE 32.0       /* fp32: 2 AVX2 FMA units x 8 lanes x 2 */
#define CPU_BYTES_PER_S_PER_CORE 10e9 /* what one core streams from DRAM, roughly */
#define CPU_MAX_BYTES_PER_S 200e9     /* per NUMA node: ~8 DDR4/DDR5 channels */
#define CPU_USD_PER_THREAD_HOUR 0.04  /* indicative cloud vCPU on-demand price */

/* Defaults for links when nothing better is known. */
#define DEFAULT_PCIE_BYTES_PER_S 32e9   /* PCIe 4.0 x16, one direction (31.5 GB/s) */
#define NVLINK_BYTES_PER_S_PER_LINK 25e9 /* NVLink 2/3/4, one direction per link */
#define DEFAULT_NIC_BYTES_PER_S (10e9 / 8) /* 10 Gb/s */

/* ------------------------------------------------------------------------- */
/* Small helpers                                                             */

/* Reads the first line of a (sysfs) file into buf without the newline; 0 on success. */
static int read_line(const char *path, char *buf, size_t size)
{
    FILE *fp = fopen(path, "r");
    if (!fp)
        return -1;
    int ok = fgets(buf, (int)size, fp) != NULL;
    fclose(fp);
    if (!ok)
        return -1;
    buf[strcspn(buf, "\n")] = '\0';
    return 0;
}

/* Reads a whole number from a file; 0 on success. */
static int read_long_long(const char *path, long long *out)
{
    char buf[64];
    if (read_line(path, buf, sizeof buf))
        return -1;
    char *end;
    errno = 0;
    long long v = strtoll(buf, &end, 10);
    if (end == buf || errno)
        return -1;
    *out = v;
    return 0;
}

/* Normalises a PCI bus id ("0000:3B:00.0", "00000000:3b:00.0") to "0000:3b:00.0". */
static void normalize_bus_id(const char *in, char out[16])
{
    unsigned dom, bus, dev, fn;
    out[0] = '\0';
    if (in && sscanf(in, "%x:%x:%x.%x", &dom, &bus, &dev, &fn) == 4)
        snprintf(out, 16, "%04x:%02x:%02x.%x", dom & 0xffffu, bus & 0xffu, dev & 0x1fu,
                 fn & 0x7u);
}

static int cmp_nic(const void *a, const void *b)
{
    return strcmp(((const hx_discover_nic *)a)->name, ((const hx_discover_nic *)b)->name);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* ------------------------------------------------------------------------- */
/* CPU clock and memory limit                                                */

/* Max core clock: cpufreq, else the highest "cpu MHz" in /proc/cpuinfo, else 0. */
static double read_cpu_max_hz(void)
{
    long long khz;
    if (!read_long_long("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", &khz) &&
        khz > 0)
        return (double)khz * 1e3;
    FILE *fp = fopen("/proc/cpuinfo", "r");
    if (!fp)
        return 0;
    char line[512];
    double best_mhz = 0;
    while (fgets(line, sizeof line, fp)) {
        if (strncmp(line, "cpu MHz", 7))
            continue;
        const char *colon = strchr(line, ':');
        if (!colon)
            continue;
        double mhz = strtod(colon + 1, NULL);
        if (isfinite(mhz) && mhz > best_mhz)
            best_mhz = mhz;
    }
    fclose(fp);
    return best_mhz * 1e6;
}

/* The cgroup (v2, else v1) memory limit of this process, 0 when none. */
static double read_memory_limit_bytes(void)
{
    char buf[64];
    if (!read_line("/sys/fs/cgroup/memory.max", buf, sizeof buf)) {
        if (!strcmp(buf, "max"))
            return 0;
        char *end;
        double v = strtod(buf, &end);
        return end != buf && v > 0 ? v : 0;
    }
    long long v1;
    /* cgroup v1 says "no limit" with a huge number (PAGE_COUNTER_MAX pages) */
    if (!read_long_long("/sys/fs/cgroup/memory/memory.limit_in_bytes", &v1) && v1 > 0 &&
        v1 < (1LL << 60))
        return (double)v1;
    return 0;
}

/* MemTotal of /proc/meminfo in bytes, 0 when unreadable. */
static double read_meminfo_total_bytes(void)
{
    FILE *fp = fopen("/proc/meminfo", "r");
    if (!fp)
        return 0;
    char line[256];
    double kib = 0;
    while (fgets(line, sizeof line, fp))
        if (sscanf(line, "MemTotal: %lf kB", &kib) == 1)
            break;
    fclose(fp);
    return kib > 0 && isfinite(kib) ? kib * 1024.0 : 0;
}

/*
 * Some virtual machines (memory hotplug, ballooning) report less memory per
 * NUMA node than the kernel's MemTotal; the nodes are then scaled up to it.
 */
static void reconcile_node_memory(hx_discovery *d)
{
    double total = read_meminfo_total_bytes();
    if (total <= 0 || d->memory_bytes <= 0 || total <= d->memory_bytes * 1.05)
        return;
    double scale = total / d->memory_bytes;
    for (size_t i = 0; i < d->nnuma; i++)
        d->numa[i].memory_bytes *= scale;
    d->memory_bytes = total;
}

/* ------------------------------------------------------------------------- */
/* hwloc: cores, NUMA nodes, PCI GPUs                                        */

/* Maximum PCIe link bandwidth of a device, one direction, from sysfs; 0 if unknown. */
static double pci_max_link_bytes_per_s(const char *bus_id)
{
    char path[256], buf[64];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/max_link_speed", bus_id);
    if (read_line(path, buf, sizeof buf))
        return 0;
    double gts = strtod(buf, NULL); /* "16.0 GT/s PCIe" */
    long long width;
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/max_link_width", bus_id);
    if (!(gts > 0) || read_long_long(path, &width) || width <= 0)
        return 0;
    /* 8b/10b encoding up to 5 GT/s (PCIe 1-2), 128b/130b from 8 GT/s on */
    double efficiency = gts <= 5.0 ? 0.8 : 128.0 / 130.0;
    return gts * 1e9 * (double)width * efficiency / 8.0;
}

/* Appends ",name" (or "name") to an owned, growable string. */
static int append_name(char **list, const char *name)
{
    size_t old = *list ? strlen(*list) : 0;
    char *n = realloc(*list, old + strlen(name) + 2);
    if (!n)
        return -1;
    if (old)
        n[old++] = ',';
    strcpy(n + old, name);
    *list = n;
    return 0;
}

static int is_gpu_class(unsigned class_id)
{
    unsigned base = class_id >> 8;
    return base == 0x03 || base == 0x12; /* display controller, processing accelerator */
}

static hx_status discover_pci_gpus(hwloc_topology_t topo, hx_discovery *d, hx_err *err)
{
    size_t n = 0;
    for (hwloc_obj_t o = hwloc_get_next_pcidev(topo, NULL); o; o = hwloc_get_next_pcidev(topo, o))
        if (is_gpu_class(o->attr->pcidev.class_id))
            n++;
    if (n == 0)
        return HX_OK;
    d->pci_gpus = calloc(n, sizeof *d->pci_gpus);
    if (!d->pci_gpus)
        return hx_err_set(err, HX_ENOMEM, "discover: out of memory");

    for (hwloc_obj_t o = hwloc_get_next_pcidev(topo, NULL); o;
         o = hwloc_get_next_pcidev(topo, o)) {
        const struct hwloc_pcidev_attr_s *pa = &o->attr->pcidev;
        if (!is_gpu_class(pa->class_id))
            continue;
        hx_discover_pci_gpu *g = &d->pci_gpus[d->npci_gpus++];
        snprintf(g->bus_id, sizeof g->bus_id, "%04x:%02x:%02x.%x", (unsigned)pa->domain,
                 (unsigned)pa->bus, (unsigned)pa->dev, (unsigned)pa->func);
        g->vendor_id = pa->vendor_id;
        g->device_id = pa->device_id;
        g->class_id = pa->class_id;
        g->numa_node = -1;

        /* The model name: a GPU OS device's "GPUModel" beats the PCI database. */
        const char *model = NULL;
        for (hwloc_obj_t c = o->io_first_child; c; c = c->next_sibling) {
            if (c->type != HWLOC_OBJ_OS_DEVICE || !c->name)
                continue;
            if (append_name(&g->os_devices, c->name))
                return hx_err_set(err, HX_ENOMEM, "discover: out of memory");
            const char *m = hwloc_obj_get_info_by_name(c, "GPUModel");
            if (m && !model)
                model = m;
        }
        if (!model)
            model = hwloc_obj_get_info_by_name(o, "PCIDevice");
        if (model && !(g->name = strdup(model)))
            return hx_err_set(err, HX_ENOMEM, "discover: out of memory");

        hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(topo, o);
        if (anc && anc->nodeset && hwloc_bitmap_weight(anc->nodeset) == 1)
            g->numa_node = hwloc_bitmap_first(anc->nodeset);

        g->link_bytes_per_s = pci_max_link_bytes_per_s(g->bus_id);
        if (g->link_bytes_per_s <= 0 && pa->linkspeed > 0)
            g->link_bytes_per_s = (double)pa->linkspeed * 1e9; /* hwloc: GB/s, current */
    }
    return HX_OK;
}

static hx_status discover_hwloc(hx_discovery *d, hx_err *err)
{
    hwloc_topology_t topo;
    hx_status st = HX_OK;
    if (hwloc_topology_init(&topo) < 0)
        return hx_err_set(err, HX_EIO, "discover: cannot initialise hwloc: %s",
                          hx_errno_text(errno));
    hwloc_topology_set_io_types_filter(topo, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    if (hwloc_topology_load(topo) < 0) {
        st = hx_err_set(err, HX_EIO, "discover: hwloc cannot read this machine's topology: %s",
                        hx_errno_text(errno));
        goto out_topo;
    }

    int cores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
    int pus = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_PU);
    d->pus = pus > 0 ? pus : 1;
    d->cores = cores > 0 ? cores : d->pus;

    int nnodes = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
    if (nnodes <= 0)
        nnodes = 1; /* hwloc always has one, but be safe */
    d->numa = calloc((size_t)nnodes, sizeof *d->numa);
    if (!d->numa) {
        st = hx_err_set(err, HX_ENOMEM, "discover: out of memory");
        goto out_topo;
    }
    for (int i = 0; i < nnodes; i++) {
        hwloc_obj_t node = hwloc_get_obj_by_type(topo, HWLOC_OBJ_NUMANODE, (unsigned)i);
        hx_discover_numa *nd = &d->numa[d->nnuma++];
        if (!node) { /* no NUMA information: the whole machine as one node */
            hwloc_obj_t root = hwloc_get_root_obj(topo);
            nd->os_index = 0;
            nd->memory_bytes = (double)root->total_memory;
            nd->cores = d->cores;
            nd->pus = d->pus;
            continue;
        }
        nd->os_index = node->os_index;
        nd->memory_bytes = (double)node->attr->numanode.local_memory;
        if (node->cpuset) {
            nd->cores = hwloc_get_nbobjs_inside_cpuset_by_type(topo, node->cpuset,
                                                               HWLOC_OBJ_CORE);
            nd->pus = hwloc_get_nbobjs_inside_cpuset_by_type(topo, node->cpuset, HWLOC_OBJ_PU);
            if (nd->cores <= 0)
                nd->cores = nd->pus > 0 ? nd->pus : 0;
            if (nd->pus < 0)
                nd->pus = 0;
        }
    }
    for (size_t i = 0; i < d->nnuma; i++)
        d->memory_bytes += d->numa[i].memory_bytes;
    reconcile_node_memory(d);

    st = discover_pci_gpus(topo, d, err);

out_topo:
    hwloc_topology_destroy(topo);
    return st;
}

/* ------------------------------------------------------------------------- */
/* Network interfaces and RDMA devices from sysfs                            */

/* The first entry of a directory (other than . and ..), strdup'ed, or NULL. */
static char *first_dir_entry(const char *path)
{
    DIR *dir = opendir(path);
    if (!dir)
        return NULL;
    char *name = NULL;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        if (!name || strcmp(e->d_name, name) < 0) {
            free(name);
            name = strdup(e->d_name);
        }
    }
    closedir(dir);
    return name;
}

static hx_status discover_nics(hx_discovery *d, hx_err *err)
{
    DIR *dir = opendir("/sys/class/net");
    if (!dir)
        return HX_OK; /* no sysfs: no interfaces known */
    hx_status st = HX_OK;
    size_t cap = 0;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        const char *name = e->d_name;
        if (name[0] == '.' || !strcmp(name, "lo"))
            continue;
        char path[512], buf[64];
        long long v;
        snprintf(path, sizeof path, "/sys/class/net/%s/type", name);
        if (!read_long_long(path, &v) && v == 772) /* ARPHRD_LOOPBACK */
            continue;
        if (d->nnics == cap) {
            size_t ncap = cap ? cap * 2 : 8;
            hx_discover_nic *nv = realloc(d->nics, ncap * sizeof *nv);
            if (!nv) {
                st = hx_err_set(err, HX_ENOMEM, "discover: out of memory");
                goto out_dir;
            }
            d->nics = nv;
            cap = ncap;
        }
        hx_discover_nic *nic = &d->nics[d->nnics];
        memset(nic, 0, sizeof *nic);
        if (!(nic->name = strdup(name))) {
            st = hx_err_set(err, HX_ENOMEM, "discover: out of memory");
            goto out_dir;
        }
        d->nnics++;
        /* speed in Mb/s; -1 or EINVAL when the link is down or virtual */
        snprintf(path, sizeof path, "/sys/class/net/%s/speed", name);
        if (!read_long_long(path, &v) && v > 0)
            nic->bytes_per_s = (double)v * 1e6 / 8.0;
        snprintf(path, sizeof path, "/sys/class/net/%s/device", name);
        nic->is_virtual = access(path, F_OK) != 0;
        snprintf(path, sizeof path, "/sys/class/net/%s/operstate", name);
        nic->is_up = !read_line(path, buf, sizeof buf) && !strcmp(buf, "up");
        snprintf(path, sizeof path, "/sys/class/net/%s/device/infiniband", name);
        nic->rdma_device = first_dir_entry(path);
    }
    if (d->nnics > 1)
        qsort(d->nics, d->nnics, sizeof *d->nics, cmp_nic);
out_dir:
    closedir(dir);
    return st;
}

static hx_status discover_rdma(hx_discovery *d, hx_err *err)
{
    DIR *dir = opendir("/sys/class/infiniband");
    if (!dir)
        return HX_OK;
    hx_status st = HX_OK;
    size_t cap = 0;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        if (d->nrdma == cap) {
            size_t ncap = cap ? cap * 2 : 4;
            char **nv = realloc(d->rdma_devices, ncap * sizeof *nv);
            if (!nv) {
                st = hx_err_set(err, HX_ENOMEM, "discover: out of memory");
                goto out_dir;
            }
            d->rdma_devices = nv;
            cap = ncap;
        }
        if (!(d->rdma_devices[d->nrdma] = strdup(e->d_name))) {
            st = hx_err_set(err, HX_ENOMEM, "discover: out of memory");
            goto out_dir;
        }
        d->nrdma++;
    }
    if (d->nrdma > 1)
        qsort(d->rdma_devices, d->nrdma, sizeof *d->rdma_devices, cmp_str);
out_dir:
    closedir(dir);
    return st;
}

/* ------------------------------------------------------------------------- */
/* CUDA driver API and NVML, loaded with dlopen                              */

/*
 * The few declarations we need, written out so that neither cuda.h nor
 * nvml.h is needed to build and neither library to run. Values are from
 * the CUDA driver API (cuda.h) and NVML (nvml.h) and are ABI-stable.
 */
typedef int hx_cu_result;  /* CUresult, CUDA_SUCCESS = 0 */
typedef int hx_cu_device;  /* CUdevice */
enum {
    HX_CU_ATTR_CLOCK_RATE = 13,              /* kHz */
    HX_CU_ATTR_MULTIPROCESSOR_COUNT = 16,
    HX_CU_ATTR_MEMORY_CLOCK_RATE = 36,       /* kHz */
    HX_CU_ATTR_GLOBAL_MEMORY_BUS_WIDTH = 37, /* bits */
    HX_CU_ATTR_COMPUTE_CAPABILITY_MAJOR = 75,
    HX_CU_ATTR_COMPUTE_CAPABILITY_MINOR = 76
};

typedef int hx_nvml_return;           /* nvmlReturn_t, NVML_SUCCESS = 0 */
typedef struct hx_nvml_device_st *hx_nvml_device; /* nvmlDevice_t, opaque */
typedef struct hx_nvml_memory {       /* nvmlMemory_t (v1) */
    unsigned long long total, free, used;
} hx_nvml_memory;
#define HX_NVML_NVLINK_MAX_LINKS 18
#define HX_NVML_FEATURE_ENABLED 1

typedef struct cuda_api {
    void *lib;
    hx_cu_result (*init)(unsigned flags);
    hx_cu_result (*device_get_count)(int *count);
    hx_cu_result (*device_get)(hx_cu_device *dev, int ordinal);
    hx_cu_result (*device_get_name)(char *name, int len, hx_cu_device dev);
    hx_cu_result (*device_total_mem)(size_t *bytes, hx_cu_device dev);
    hx_cu_result (*device_get_attribute)(int *value, int attr, hx_cu_device dev);
    hx_cu_result (*device_get_pci_bus_id)(char *bus_id, int len, hx_cu_device dev);
} cuda_api;

typedef struct nvml_api {
    void *lib;
    hx_nvml_return (*init)(void);
    hx_nvml_return (*shutdown)(void);
    hx_nvml_return (*device_get_count)(unsigned *count);
    hx_nvml_return (*device_get_handle_by_index)(unsigned index, hx_nvml_device *dev);
    hx_nvml_return (*device_get_handle_by_pci_bus_id)(const char *bus_id, hx_nvml_device *dev);
    hx_nvml_return (*device_get_name)(hx_nvml_device dev, char *name, unsigned len);
    hx_nvml_return (*device_get_memory_info)(hx_nvml_device dev, hx_nvml_memory *mem);
    hx_nvml_return (*device_get_nvlink_state)(hx_nvml_device dev, unsigned link, int *active);
} nvml_api;

/*
 * Looks a symbol up into a function pointer. ISO C has no conversion from
 * void * to a function pointer; POSIX guarantees the representations agree,
 * so the bytes are copied.
 */
static int load_sym(void *lib, const char *name, void *fnptr, size_t fnsize)
{
    void *sym = dlsym(lib, name);
    if (!sym || fnsize != sizeof sym)
        return -1;
    memcpy(fnptr, &sym, fnsize);
    return 0;
}
#define LOAD(lib, name, field) load_sym((lib), (name), &(field), sizeof(field))

/* Opens libcuda and initialises the driver; 0 on success. Never unloaded:
 * the driver starts threads of its own, and unloading it under them is unsafe. */
static int cuda_open(cuda_api *api)
{
    memset(api, 0, sizeof *api);
    api->lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!api->lib)
        return -1;
    if (LOAD(api->lib, "cuInit", api->init) ||
        LOAD(api->lib, "cuDeviceGetCount", api->device_get_count) ||
        LOAD(api->lib, "cuDeviceGet", api->device_get) ||
        LOAD(api->lib, "cuDeviceGetName", api->device_get_name) ||
        LOAD(api->lib, "cuDeviceTotalMem_v2", api->device_total_mem))
        return -1;
    /* optional */
    if (LOAD(api->lib, "cuDeviceGetAttribute", api->device_get_attribute))
        api->device_get_attribute = NULL;
    if (LOAD(api->lib, "cuDeviceGetPCIBusId", api->device_get_pci_bus_id))
        api->device_get_pci_bus_id = NULL;
    return api->init(0) == 0 ? 0 : -1;
}

/* Opens NVML and initialises it; 0 on success (call nvml_close after). */
static int nvml_open(nvml_api *api)
{
    memset(api, 0, sizeof *api);
    api->lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!api->lib)
        return -1;
    if (LOAD(api->lib, "nvmlInit_v2", api->init) ||
        LOAD(api->lib, "nvmlShutdown", api->shutdown) ||
        LOAD(api->lib, "nvmlDeviceGetCount_v2", api->device_get_count) ||
        LOAD(api->lib, "nvmlDeviceGetHandleByIndex_v2", api->device_get_handle_by_index) ||
        LOAD(api->lib, "nvmlDeviceGetName", api->device_get_name) ||
        LOAD(api->lib, "nvmlDeviceGetMemoryInfo", api->device_get_memory_info)) {
        dlclose(api->lib);
        api->lib = NULL;
        return -1;
    }
    if (LOAD(api->lib, "nvmlDeviceGetHandleByPciBusId_v2",
             api->device_get_handle_by_pci_bus_id))
        api->device_get_handle_by_pci_bus_id = NULL;
    if (LOAD(api->lib, "nvmlDeviceGetNvLinkState", api->device_get_nvlink_state))
        api->device_get_nvlink_state = NULL;
    if (api->init() != 0) {
        dlclose(api->lib);
        api->lib = NULL;
        return -1;
    }
    return 0;
}

static void nvml_close(nvml_api *api)
{
    if (!api->lib)
        return;
    api->shutdown();
    dlclose(api->lib);
    api->lib = NULL;
}

static int nvml_active_links(const nvml_api *api, hx_nvml_device dev)
{
    if (!api->device_get_nvlink_state)
        return 0;
    int n = 0;
    for (unsigned l = 0; l < HX_NVML_NVLINK_MAX_LINKS; l++) {
        int active = 0;
        if (api->device_get_nvlink_state(dev, l, &active) == 0 &&
            active == HX_NVML_FEATURE_ENABLED)
            n++;
    }
    return n;
}

static hx_status alloc_gpus(hx_discovery *d, size_t n, hx_err *err)
{
    d->gpus = calloc(n, sizeof *d->gpus);
    if (!d->gpus)
        return hx_err_set(err, HX_ENOMEM, "discover: out of memory");
    return HX_OK;
}

static hx_status discover_cuda(hx_discovery *d, const nvml_api *nvml, hx_err *err)
{
    cuda_api cu;
    int count = 0;
    if (cuda_open(&cu) || cu.device_get_count(&count) != 0 || count <= 0)
        return HX_OK; /* no driver, no devices: no CUDA GPUs */
    hx_status st = alloc_gpus(d, (size_t)count, err);
    if (st)
        return st;
    for (int i = 0; i < count; i++) {
        hx_cu_device dev;
        char name[256];
        size_t mem = 0;
        if (cu.device_get(&dev, i) != 0 || cu.device_get_name(name, sizeof name, dev) != 0)
            continue;
        name[sizeof name - 1] = '\0';
        hx_discover_gpu *g = &d->gpus[d->ngpus];
        if (!(g->name = strdup(name)))
            return hx_err_set(err, HX_ENOMEM, "discover: out of memory");
        d->ngpus++;
        g->index = i;
        if (cu.device_total_mem(&mem, dev) == 0)
            g->memory_bytes = (double)mem;
        if (cu.device_get_attribute) {
            int v;
            if (cu.device_get_attribute(&v, HX_CU_ATTR_COMPUTE_CAPABILITY_MAJOR, dev) == 0)
                g->cc_major = v;
            if (cu.device_get_attribute(&v, HX_CU_ATTR_COMPUTE_CAPABILITY_MINOR, dev) == 0)
                g->cc_minor = v;
            if (cu.device_get_attribute(&v, HX_CU_ATTR_MULTIPROCESSOR_COUNT, dev) == 0)
                g->sm_count = v;
            if (cu.device_get_attribute(&v, HX_CU_ATTR_CLOCK_RATE, dev) == 0 && v > 0)
                g->clock_hz = (double)v * 1e3;
            if (cu.device_get_attribute(&v, HX_CU_ATTR_MEMORY_CLOCK_RATE, dev) == 0 && v > 0)
                g->mem_clock_hz = (double)v * 1e3;
            if (cu.device_get_attribute(&v, HX_CU_ATTR_GLOBAL_MEMORY_BUS_WIDTH, dev) == 0)
                g->mem_bus_width_bits = v;
        }
        char bus[64];
        if (cu.device_get_pci_bus_id && cu.device_get_pci_bus_id(bus, sizeof bus, dev) == 0) {
            bus[sizeof bus - 1] = '\0';
            normalize_bus_id(bus, g->bus_id);
        }
        hx_nvml_device h;
        if (nvml->lib && nvml->device_get_handle_by_pci_bus_id && g->bus_id[0] &&
            nvml->device_get_handle_by_pci_bus_id(g->bus_id, &h) == 0)
            g->nvlink_active_links = nvml_active_links(nvml, h);
        g->catalog_type = hx_catalog_match_device_name(g->name, g->memory_bytes);
    }
    if (d->ngpus > 0)
        d->gpu_source = "cuda";
    return HX_OK;
}

/* NVML alone (no usable CUDA driver): names, memory and NVLinks. */
static hx_status discover_nvml(hx_discovery *d, const nvml_api *nvml, hx_err *err)
{
    unsigned count = 0;
    if (!nvml->lib || nvml->device_get_count(&count) != 0 || count == 0)
        return HX_OK;
    hx_status st = alloc_gpus(d, count, err);
    if (st)
        return st;
    for (unsigned i = 0; i < count; i++) {
        hx_nvml_device h;
        char name[256];
        if (nvml->device_get_handle_by_index(i, &h) != 0 ||
            nvml->device_get_name(h, name, sizeof name) != 0)
            continue;
        name[sizeof name - 1] = '\0';
        hx_discover_gpu *g = &d->gpus[d->ngpus];
        if (!(g->name = strdup(name)))
            return hx_err_set(err, HX_ENOMEM, "discover: out of memory");
        d->ngpus++;
        g->index = (int)i;
        hx_nvml_memory mem;
        if (nvml->device_get_memory_info(h, &mem) == 0)
            g->memory_bytes = (double)mem.total;
        g->nvlink_active_links = nvml_active_links(nvml, h);
        g->catalog_type = hx_catalog_match_device_name(g->name, g->memory_bytes);
    }
    if (d->ngpus > 0)
        d->gpu_source = "nvml";
    return HX_OK;
}

static hx_status discover_gpus(hx_discovery *d, hx_err *err)
{
    nvml_api nvml;
    if (nvml_open(&nvml))
        nvml.lib = NULL;
    hx_status st = discover_cuda(d, &nvml, err);
    if (st == HX_OK && d->ngpus == 0) {
        free(d->gpus);
        d->gpus = NULL;
        st = discover_nvml(d, &nvml, err);
    }
    nvml_close(&nvml);
    return st;
}

/* ------------------------------------------------------------------------- */
/* Run and free                                                              */

/* The host name, with characters an inventory name does not allow replaced by '-'. */
static char *discover_hostname(void)
{
    char buf[256];
    if (gethostname(buf, sizeof buf) != 0 || !buf[0])
        snprintf(buf, sizeof buf, "localhost");
    buf[sizeof buf - 1] = '\0';
    buf[127] = '\0'; /* inventory names are at most 127 characters */
    for (char *p = buf; *p; p++)
        if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_' && *p != '.')
            *p = '-';
    return strdup(buf);
}

hx_status hx_discover_run(hx_discovery **out, hx_err *err)
{
    hx_status st;
    *out = NULL;
    hx_discovery *d = calloc(1, sizeof *d);
    if (!d)
        return hx_err_set(err, HX_ENOMEM, "discover: out of memory");
    d->gpu_source = "none";
    if (!(d->hostname = discover_hostname())) {
        st = hx_err_set(err, HX_ENOMEM, "discover: out of memory");
        goto out_free;
    }
    if ((st = discover_hwloc(d, err)) != HX_OK)
        goto out_free;
    d->cpu_max_hz = read_cpu_max_hz();
    d->memory_limit_bytes = read_memory_limit_bytes();
    if (d->memory_bytes > 0 && d->memory_limit_bytes >= d->memory_bytes)
        d->memory_limit_bytes = 0; /* not a limit */
    if ((st = discover_nics(d, err)) != HX_OK)
        goto out_free;
    if ((st = discover_rdma(d, err)) != HX_OK)
        goto out_free;
    if ((st = discover_gpus(d, err)) != HX_OK)
        goto out_free;
    *out = d;
    return HX_OK;

out_free:
    hx_discovery_free(d);
    return st;
}

void hx_discovery_free(hx_discovery *d)
{
    if (!d)
        return;
    free(d->hostname);
    free(d->numa);
    for (size_t i = 0; i < d->npci_gpus; i++) {
        free(d->pci_gpus[i].name);
        free(d->pci_gpus[i].os_devices);
    }
    free(d->pci_gpus);
    for (size_t i = 0; i < d->nnics; i++) {
        free(d->nics[i].name);
        free(d->nics[i].rdma_device);
    }
    free(d->nics);
    for (size_t i = 0; i < d->nrdma; i++)
        free(d->rdma_devices[i]);
    free(d->rdma_devices);
    for (size_t i = 0; i < d->ngpus; i++)
        free(d->gpus[i].name);
    free(d->gpus);
    free(d);
}

/* ------------------------------------------------------------------------- */
/* Summary: the inventory host entry                                         */

/*
 * Estimates for the `cpu` type, per NUMA node (one device per node). These
 * are rough on purpose; measured figures belong in the inventory:
 *   memory:     the smallest node's memory (or its share of a cgroup limit),
 *               less 10% and at least 1 GiB for the OS;
 *   flops:      cores x max clock x 32 fp32 FLOP/cycle (2 AVX2 FMA units),
 *               recorded as bf16_flops, which for `cpu` means fp32;
 *   bandwidth:  ~10 GB/s per core, at most 200 GB/s per node;
 *   price:      ~$0.04 per hardware thread and hour (cloud vCPU list price).
 */
static void estimate_cpu_type(const hx_discovery *d, int *count, hx_gpu_spec *spec)
{
    int nodes = 0, min_cores = 0, min_pus = 0;
    double min_mem = 0;
    for (size_t i = 0; i < d->nnuma; i++) {
        const hx_discover_numa *n = &d->numa[i];
        if (n->pus <= 0 && n->cores <= 0)
            continue; /* memory-only node (CXL, HBM): not a device */
        if (nodes == 0 || n->cores < min_cores)
            min_cores = n->cores;
        if (nodes == 0 || n->pus < min_pus)
            min_pus = n->pus;
        if (n->memory_bytes > 0 && (min_mem == 0 || n->memory_bytes < min_mem))
            min_mem = n->memory_bytes;
        nodes++;
    }
    if (nodes == 0) { /* no usable NUMA information: the machine as one device */
        nodes = 1;
        min_cores = d->cores;
        min_pus = d->pus;
    }
    if (min_cores <= 0)
        min_cores = min_pus > 0 ? min_pus : 1;
    if (min_pus <= 0)
        min_pus = min_cores;
    if (min_mem <= 0)
        min_mem = d->memory_bytes > 0 ? d->memory_bytes / nodes : 4 * GiB;
    if (d->memory_limit_bytes > 0 && d->memory_limit_bytes / nodes < min_mem)
        min_mem = d->memory_limit_bytes / nodes;

    double usable = min_mem * 0.9;
    if (min_mem - usable < GiB)
        usable = min_mem - GiB;
    if (usable >= 2 * GiB)
        usable = floor(usable / GiB) * GiB;
    else if (usable >= 256 * MiB)
        usable = floor(usable / (64 * MiB)) * 64 * MiB;
    else
        usable = min_mem / 2 > 64 * MiB ? floor(min_mem / 2 / MiB) * MiB : 64 * MiB;

    double hz = d->cpu_max_hz > 0 ? d->cpu_max_hz : CPU_DEFAULT_HZ;
    double bw = min_cores * CPU_BYTES_PER_S_PER_CORE;
    if (bw > CPU_MAX_BYTES_PER_S)
        bw = CPU_MAX_BYTES_PER_S;
    double price = round(min_pus * CPU_USD_PER_THREAD_HOUR * 100) / 100;

    memset(spec, 0, sizeof *spec);
    snprintf(spec->name, sizeof spec->name, "cpu");
    spec->memory_bytes = usable;
    spec->bf16_flops = min_cores * hz * CPU_FLOP_PER_CYCLE;
    spec->hbm_bytes_per_s = bw;
    spec->usd_per_hour = price > 0.01 ? price : 0.01;
    spec->is_cpu = 1;
    *count = nodes;
}

/* Dense BF16 (FP16 before Ampere) tensor FLOP per SM and clock, by compute capability. */
static double tensor_flop_per_sm_clock(int major, int minor)
{
    if (major >= 10)
        return 8192; /* Blackwell */
    if (major == 9)
        return 4096; /* Hopper: H100 SXM 132 SMs x 1.83 GHz x 4096 = 989 TFLOP/s */
    if (major == 8 && minor == 0)
        return 2048; /* A100: 108 x 1.41 GHz x 2048 = 312 TFLOP/s */
    if (major >= 7)
        return 1024; /* Volta, Turing, GA10x, Ada: L40S 142 x 2.52 GHz x 1024 = 366 */
    return 256;      /* no tensor cores: a rough fp16 rate */
}

/* A custom type name from a model string: "NVIDIA GH200 480GB" -> "GH200-480GB". */
static void custom_type_name(const char *model, char name[HX_GPU_NAME_MAX])
{
    static const char *const drop[] = {"NVIDIA ", "AMD ", NULL};
    for (int i = 0; drop[i]; i++)
        if (!strncasecmp(model, drop[i], strlen(drop[i])))
            model += strlen(drop[i]);
    size_t n = 0;
    int dash = 0;
    for (const char *p = model; *p && n + 1 < HX_GPU_NAME_MAX; p++) {
        if (isalnum((unsigned char)*p) || *p == '.' || *p == '_') {
            if (dash && n > 0)
                name[n++] = '-';
            dash = 0;
            if (n + 1 < HX_GPU_NAME_MAX)
                name[n++] = *p;
        } else {
            dash = 1;
        }
    }
    name[n] = '\0';
    if (n == 0)
        snprintf(name, HX_GPU_NAME_MAX, "gpu");
    /* never shadow a catalog entry with made-up figures */
    if (hx_catalog_find(name)) {
        char tmp[HX_GPU_NAME_MAX];
        snprintf(tmp, sizeof tmp, "%s", name);
        snprintf(name, HX_GPU_NAME_MAX, "local-%.*s", HX_GPU_NAME_MAX - 7, tmp);
    }
}

/* Figures for a GPU model the catalog does not know, from what the driver says. */
static void estimate_gpu_type(const hx_discover_gpu *g, hx_gpu_spec *spec)
{
    memset(spec, 0, sizeof *spec);
    custom_type_name(g->name ? g->name : "", spec->name);
    spec->memory_bytes = g->memory_bytes > 0 ? g->memory_bytes : 16 * GiB;
    if (g->sm_count > 0 && g->clock_hz > 0)
        spec->bf16_flops =
            g->sm_count * g->clock_hz * tensor_flop_per_sm_clock(g->cc_major, g->cc_minor);
    else
        spec->bf16_flops = 100e12; /* placeholder */
    if (g->mem_clock_hz > 0 && g->mem_bus_width_bits > 0)
        spec->hbm_bytes_per_s = 2.0 * g->mem_clock_hz * g->mem_bus_width_bits / 8.0; /* DDR */
    else
        spec->hbm_bytes_per_s = 1e12; /* placeholder */
    spec->usd_per_hour = 1.00;        /* placeholder */
}

static const hx_discover_pci_gpu *find_pci(const hx_discovery *d, const char *bus_id)
{
    for (size_t i = 0; bus_id[0] && i < d->npci_gpus; i++)
        if (!strcmp(d->pci_gpus[i].bus_id, bus_id))
            return &d->pci_gpus[i];
    return NULL;
}

static int same_model(const hx_discover_gpu *a, const hx_discover_gpu *b)
{
    return a->name && b->name && !strcmp(a->name, b->name);
}

static void summarize_gpus(const hx_discovery *d, hx_discover_summary *s)
{
    /* the most common model (first one on ties) */
    size_t best = 0;
    int best_count = 0;
    for (size_t i = 0; i < d->ngpus; i++) {
        int c = 0;
        for (size_t j = 0; j < d->ngpus; j++)
            c += same_model(&d->gpus[i], &d->gpus[j]);
        if (c > best_count) {
            best_count = c;
            best = i;
        }
    }
    const hx_discover_gpu *rep = &d->gpus[best];
    s->count = best_count;
    s->other_gpus = (int)d->ngpus - best_count;
    const hx_gpu_spec *known = rep->catalog_type ? hx_catalog_find(rep->catalog_type) : NULL;
    if (known) {
        s->type = *known;
    } else {
        estimate_gpu_type(rep, &s->type);
        s->type_is_custom = 1;
    }

    int min_links = INT_MAX;
    double min_pcie = 0;
    for (size_t i = 0; i < d->ngpus; i++) {
        const hx_discover_gpu *g = &d->gpus[i];
        if (!same_model(g, rep))
            continue;
        if (g->nvlink_active_links < min_links)
            min_links = g->nvlink_active_links;
        const hx_discover_pci_gpu *p = find_pci(d, g->bus_id);
        if (p && p->link_bytes_per_s > 0 && (min_pcie == 0 || p->link_bytes_per_s < min_pcie))
            min_pcie = p->link_bytes_per_s;
    }
    if (min_links > 0 && min_links != INT_MAX) {
        s->intra_kind = HX_INTRA_NVLINK;
        s->intra_bytes_per_s = min_links * NVLINK_BYTES_PER_S_PER_LINK;
    } else {
        s->intra_kind = HX_INTRA_PCIE;
        s->intra_bytes_per_s = min_pcie > 0 ? min_pcie : DEFAULT_PCIE_BYTES_PER_S;
    }
}

hx_status hx_discover_summarize(const hx_discovery *d, hx_discover_summary *s)
{
    memset(s, 0, sizeof *s);
    if (!d || d->nnuma == 0 || !d->numa)
        return HX_EINVAL;
    if (d->ngpus > 0) {
        summarize_gpus(d, s);
    } else {
        estimate_cpu_type(d, &s->count, &s->type);
        s->type_is_custom = 1;
        s->intra_kind = HX_INTRA_NONE;
        /* shared-memory copies between NUMA nodes: half a node's memory
         * bandwidth, an estimate */
        s->intra_bytes_per_s = s->type.hbm_bytes_per_s / 2;
    }

    /* The fastest interface with a known speed, physical ones first. */
    double phys = 0, any = 0;
    for (size_t i = 0; i < d->nnics; i++) {
        const hx_discover_nic *n = &d->nics[i];
        if (n->bytes_per_s > any)
            any = n->bytes_per_s;
        if (!n->is_virtual && n->bytes_per_s > phys)
            phys = n->bytes_per_s;
    }
    s->nic_bytes_per_s = phys > 0 ? phys : any;
    s->nic_speed_known = s->nic_bytes_per_s > 0;
    if (!s->nic_speed_known)
        s->nic_bytes_per_s = DEFAULT_NIC_BYTES_PER_S;
    s->nic_rdma = d->nrdma > 0;
    return HX_OK;
}

/* ------------------------------------------------------------------------- */
/* YAML                                                                      */

/* A number with up to 3-4 significant digits and no exponent: "0.166", "989", "12.5". */
static const char *fmt_num(double v, char *buf, size_t size)
{
    if (v >= 100)
        snprintf(buf, size, "%.0f", v);
    else if (v >= 10)
        snprintf(buf, size, "%.1f", v);
    else if (v >= 1)
        snprintf(buf, size, "%.2f", v);
    else
        snprintf(buf, size, "%.3f", v);
    char *dot = strchr(buf, '.');
    if (dot) {
        char *end = buf + strlen(buf);
        while (end > dot + 1 && end[-1] == '0')
            *--end = '\0';
        if (end == dot + 1)
            *dot = '\0';
    }
    return buf;
}

/* Bytes as "80GiB" (whole GiB) or "81559MiB". */
static const char *fmt_bytes(double bytes, char *buf, size_t size)
{
    double gib = bytes / GiB;
    if (gib >= 1 && fabs(gib - round(gib)) < 1e-9)
        snprintf(buf, size, "%.0fGiB", round(gib));
    else
        snprintf(buf, size, "%.0fMiB", floor(bytes / MiB));
    return buf;
}

/* Bytes/s as "25GB/s" (3-4 significant digits). */
static const char *fmt_bytes_per_s(double v, char *buf, size_t size)
{
    char num[32];
    if (v >= 1e12)
        snprintf(buf, size, "%sTB/s", fmt_num(v / 1e12, num, sizeof num));
    else if (v >= 1e9)
        snprintf(buf, size, "%sGB/s", fmt_num(v / 1e9, num, sizeof num));
    else
        snprintf(buf, size, "%sMB/s", fmt_num(v / 1e6, num, sizeof num));
    return buf;
}

/* Bits/s as "100Gb/s", "2.5Gb/s", "100Mb/s". */
static const char *fmt_bits_per_s(double bytes_per_s, char *buf, size_t size)
{
    char num[32];
    double bits = bytes_per_s * 8;
    if (bits >= 1e9)
        snprintf(buf, size, "%sGb/s", fmt_num(bits / 1e9, num, sizeof num));
    else
        snprintf(buf, size, "%sMb/s", fmt_num(bits / 1e6, num, sizeof num));
    return buf;
}

static const char *intra_kind_name(hx_intra_kind k)
{
    return k == HX_INTRA_NVLINK ? "nvlink" : k == HX_INTRA_PCIE ? "pcie" : "none";
}

/* Writes `s` as a YAML double-quoted scalar. */
static void put_quoted(FILE *fp, const char *s)
{
    fputc('"', fp);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(fp, "\\%c", *p);
        else if (*p < 0x20 || *p == 0x7f)
            fprintf(fp, "\\x%02x", *p);
        else
            fputc(*p, fp);
    }
    fputc('"', fp);
}

/*
 * Writes a name as a plain YAML scalar when it reads as a string in YAML
 * ("H100-SXM", "node-1.example"), else double-quoted ("123", "true").
 */
static void put_name(FILE *fp, const char *s)
{
    static const char *const keywords[] = {"y", "n", "yes", "no", "true", "false", "on",
                                           "off", "null", NULL};
    int plain = isalpha((unsigned char)s[0]) != 0;
    for (const char *p = s; plain && *p; p++)
        plain = isalnum((unsigned char)*p) || *p == '-' || *p == '_' || *p == '.';
    for (int i = 0; plain && keywords[i]; i++)
        plain = strcasecmp(s, keywords[i]) != 0;
    if (plain)
        fputs(s, fp);
    else
        put_quoted(fp, s);
}

/* A one-line, comment-safe copy of an outside string (no newlines). */
static void put_comment_text(FILE *fp, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        fputc(*p < 0x20 || *p == 0x7f ? '?' : *p, fp);
}

hx_status hx_discover_write_yaml(const hx_discovery *d, FILE *fp)
{
    hx_discover_summary s;
    if (!d || !fp || hx_discover_summarize(d, &s) != HX_OK)
        return HX_EINVAL;
    char b1[48], b2[48], b3[48], b4[48];
    const char *host = d->hostname ? d->hostname : "localhost";

    fprintf(fp, "# Inventory fragment for this machine, written by `hexflow discover`.\n");
    fprintf(fp, "# Found: %d core%s (%d thread%s), %zu NUMA node%s, %s of memory", d->cores,
            d->cores == 1 ? "" : "s", d->pus, d->pus == 1 ? "" : "s", d->nnuma,
            d->nnuma == 1 ? "" : "s", hx_units_fmt_bytes(d->memory_bytes, b1, sizeof b1));
    if (d->memory_limit_bytes > 0)
        fprintf(fp, " (cgroup limit %s)", hx_units_fmt_bytes(d->memory_limit_bytes, b1, sizeof b1));
    if (d->ngpus > 0)
        fprintf(fp, ", %zu GPU%s (from %s).\n", d->ngpus, d->ngpus == 1 ? "" : "s",
                d->gpu_source);
    else
        fprintf(fp, ", no CUDA GPU.\n");
    for (size_t i = 0; i < d->ngpus; i++) {
        const hx_discover_gpu *g = &d->gpus[i];
        fprintf(fp, "#   GPU %d: ", g->index);
        put_comment_text(fp, g->name ? g->name : "?");
        fprintf(fp, ", %s -> %s\n", hx_units_fmt_bytes(g->memory_bytes, b1, sizeof b1),
                g->catalog_type ? g->catalog_type : "not in the catalog");
    }
    if (d->ngpus == 0 && d->npci_gpus > 0) {
        fprintf(fp, "#   %zu PCI display/accelerator device%s but no usable CUDA driver, e.g. ",
                d->npci_gpus, d->npci_gpus == 1 ? "" : "s");
        put_comment_text(fp, d->pci_gpus[0].name ? d->pci_gpus[0].name : "unknown model");
        fprintf(fp, " [%04x:%04x]: listed as cpu devices.\n", d->pci_gpus[0].vendor_id,
                d->pci_gpus[0].device_id);
    }
    if (s.other_gpus > 0)
        fprintf(fp, "#   %d GPU%s of other models left out: a host has one device type.\n",
                s.other_gpus, s.other_gpus == 1 ? "" : "s");
    fprintf(fp, "# Edit before use: `address` (`local` means this machine, no SSH; put an\n"
                "# address to reach it from elsewhere), the estimated figures and prices\n"
                "# below (measured ones are better), and the NIC if it is wrong.\n"
                "# Check with: hexflow inventory check FILE\n");

    fputs("name: ", fp);
    put_name(fp, host);
    fputc('\n', fp);

    if (s.type_is_custom) {
        fputs("gpu_types:\n", fp);
        if (s.type.is_cpu)
            fprintf(fp,
                    "  # `cpu`: one device per NUMA node, figures ESTIMATED from this machine:\n"
                    "  # memory of a node less room for the OS; bf16_tflops is fp32, cores x\n"
                    "  # %.2f GHz%s x 32 FLOP/cycle (AVX2 FMA); ~10 GB/s of memory bandwidth\n"
                    "  # per core; an indicative price. Replace them with measured figures.\n",
                    (d->cpu_max_hz > 0 ? d->cpu_max_hz : CPU_DEFAULT_HZ) / 1e9,
                    d->cpu_max_hz > 0 ? "" : " (assumed)");
        else
            fprintf(fp, "  # not in the catalog: figures ESTIMATED from the compute capability,\n"
                        "  # SM count and clocks (placeholders where the driver did not say);\n"
                        "  # check them against the vendor datasheet, and set the price.\n");
        fputs("  - {name: ", fp);
        put_name(fp, s.type.name);
        fprintf(fp, ", memory: %s, bf16_tflops: %s, hbm_bandwidth: %s, price_per_hour: %s}\n",
                fmt_bytes(s.type.memory_bytes, b1, sizeof b1),
                fmt_num(s.type.bf16_flops / 1e12, b2, sizeof b2),
                fmt_bytes_per_s(s.type.hbm_bytes_per_s, b3, sizeof b3),
                fmt_num(s.type.usd_per_hour, b4, sizeof b4));
    }

    fputs("hosts:\n  - name: ", fp);
    put_name(fp, host);
    fputs("\n    address: local\n", fp);
    fputs("    gpus: {type: ", fp);
    put_name(fp, s.type.name);
    fprintf(fp, ", count: %d}\n", s.count);
    fprintf(fp, "    intra: {kind: %s, bandwidth: %s}\n", intra_kind_name(s.intra_kind),
            fmt_bytes_per_s(s.intra_bytes_per_s, b1, sizeof b1));
    fprintf(fp, "    nic: {bandwidth: %s, rdma: %s}%s\n",
            fmt_bits_per_s(s.nic_bytes_per_s, b1, sizeof b1), s.nic_rdma ? "true" : "false",
            s.nic_speed_known ? "" : "  # link speed unknown: a default");
    return ferror(fp) ? HX_EIO : HX_OK;
}

/* ------------------------------------------------------------------------- */
/* JSON                                                                      */

/* Adds `value` (a new reference, may be NULL) to `obj`; 0 on success. */
static int set_new(json_t *obj, const char *key, json_t *value)
{
    return value ? json_object_set_new(obj, key, value) : -1;
}

static json_t *string_or_null(const char *s)
{
    return s ? json_string(s) : json_null();
}

static json_t *spec_to_json(const hx_gpu_spec *t)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    if (set_new(o, "name", json_string(t->name)) ||
        set_new(o, "memory_bytes", json_real(t->memory_bytes)) ||
        set_new(o, "bf16_flops", json_real(t->bf16_flops)) ||
        set_new(o, "hbm_bytes_per_s", json_real(t->hbm_bytes_per_s)) ||
        set_new(o, "usd_per_hour", json_real(t->usd_per_hour)) ||
        set_new(o, "is_cpu", json_boolean(t->is_cpu))) {
        json_decref(o);
        return NULL;
    }
    return o;
}

json_t *hx_discover_to_json(const hx_discovery *d)
{
    hx_discover_summary s;
    if (!d || hx_discover_summarize(d, &s) != HX_OK)
        return NULL;
    json_t *root = json_object();
    json_t *arr = NULL, *o = NULL;
    if (!root)
        return NULL;
    if (set_new(root, "hostname", string_or_null(d->hostname)) ||
        set_new(root, "cores", json_integer(d->cores)) ||
        set_new(root, "pus", json_integer(d->pus)) ||
        set_new(root, "memory_bytes", json_real(d->memory_bytes)) ||
        set_new(root, "memory_limit_bytes", json_real(d->memory_limit_bytes)) ||
        set_new(root, "cpu_max_hz", json_real(d->cpu_max_hz)) ||
        set_new(root, "gpu_source", json_string(d->gpu_source ? d->gpu_source : "none")))
        goto out_fail;

    if (set_new(root, "numa_nodes", arr = json_array()))
        goto out_fail;
    for (size_t i = 0; i < d->nnuma; i++) {
        const hx_discover_numa *n = &d->numa[i];
        if (json_array_append_new(arr, o = json_object()) || !o ||
            set_new(o, "os_index", json_integer(n->os_index)) ||
            set_new(o, "memory_bytes", json_real(n->memory_bytes)) ||
            set_new(o, "cores", json_integer(n->cores)) ||
            set_new(o, "pus", json_integer(n->pus)))
            goto out_fail;
    }

    if (set_new(root, "pci_gpus", arr = json_array()))
        goto out_fail;
    for (size_t i = 0; i < d->npci_gpus; i++) {
        const hx_discover_pci_gpu *p = &d->pci_gpus[i];
        char id[8];
        if (json_array_append_new(arr, o = json_object()) || !o ||
            set_new(o, "bus_id", json_string(p->bus_id)))
            goto out_fail;
        snprintf(id, sizeof id, "%04x", p->vendor_id & 0xffffu);
        if (set_new(o, "vendor_id", json_string(id)))
            goto out_fail;
        snprintf(id, sizeof id, "%04x", p->device_id & 0xffffu);
        if (set_new(o, "device_id", json_string(id)))
            goto out_fail;
        snprintf(id, sizeof id, "%04x", p->class_id & 0xffffu);
        if (set_new(o, "class_id", json_string(id)) ||
            set_new(o, "name", string_or_null(p->name)) ||
            set_new(o, "os_devices", string_or_null(p->os_devices)) ||
            set_new(o, "link_bytes_per_s", json_real(p->link_bytes_per_s)) ||
            set_new(o, "numa_node", json_integer(p->numa_node)))
            goto out_fail;
    }

    if (set_new(root, "nics", arr = json_array()))
        goto out_fail;
    for (size_t i = 0; i < d->nnics; i++) {
        const hx_discover_nic *n = &d->nics[i];
        if (json_array_append_new(arr, o = json_object()) || !o ||
            set_new(o, "name", string_or_null(n->name)) ||
            set_new(o, "bytes_per_s", json_real(n->bytes_per_s)) ||
            set_new(o, "virtual", json_boolean(n->is_virtual)) ||
            set_new(o, "up", json_boolean(n->is_up)) ||
            set_new(o, "rdma_device", string_or_null(n->rdma_device)))
            goto out_fail;
    }

    if (set_new(root, "rdma_devices", arr = json_array()))
        goto out_fail;
    for (size_t i = 0; i < d->nrdma; i++)
        if (json_array_append_new(arr, json_string(d->rdma_devices[i])))
            goto out_fail;

    if (set_new(root, "gpus", arr = json_array()))
        goto out_fail;
    for (size_t i = 0; i < d->ngpus; i++) {
        const hx_discover_gpu *g = &d->gpus[i];
        char cc[16];
        snprintf(cc, sizeof cc, "%d.%d", g->cc_major, g->cc_minor);
        if (json_array_append_new(arr, o = json_object()) || !o ||
            set_new(o, "index", json_integer(g->index)) ||
            set_new(o, "name", string_or_null(g->name)) ||
            set_new(o, "memory_bytes", json_real(g->memory_bytes)) ||
            set_new(o, "bus_id", json_string(g->bus_id)) ||
            set_new(o, "catalog_type", string_or_null(g->catalog_type)) ||
            set_new(o, "compute_capability", g->cc_major ? json_string(cc) : json_null()) ||
            set_new(o, "sm_count", json_integer(g->sm_count)) ||
            set_new(o, "clock_hz", json_real(g->clock_hz)) ||
            set_new(o, "mem_clock_hz", json_real(g->mem_clock_hz)) ||
            set_new(o, "mem_bus_width_bits", json_integer(g->mem_bus_width_bits)) ||
            set_new(o, "nvlink_active_links", json_integer(g->nvlink_active_links)))
            goto out_fail;
    }

    if (set_new(root, "inventory", o = json_object()) ||
        set_new(o, "type", spec_to_json(&s.type)) ||
        set_new(o, "type_is_custom", json_boolean(s.type_is_custom)) ||
        set_new(o, "count", json_integer(s.count)) ||
        set_new(o, "other_gpus", json_integer(s.other_gpus)) ||
        set_new(o, "intra_kind", json_string(intra_kind_name(s.intra_kind))) ||
        set_new(o, "intra_bytes_per_s", json_real(s.intra_bytes_per_s)) ||
        set_new(o, "nic_bytes_per_s", json_real(s.nic_bytes_per_s)) ||
        set_new(o, "nic_speed_known", json_boolean(s.nic_speed_known)) ||
        set_new(o, "nic_rdma", json_boolean(s.nic_rdma)))
        goto out_fail;
    return root;

out_fail:
    json_decref(root);
    return NULL;
}
