// moecomm._C: the nanobind extension behind the `moecomm` Python package. One file of a little
// over 500 lines on purpose: every binding of the C++ API is here, so that the Python surface
// reads in one place (the DLPack conversions are apart, in tensors.cpp).
//
// Thin by design: tensors cross as DLPack (tensors.hpp), every call that may wait (exact HT
// dispatch waits on the host for the counts; synchronize; event waits) releases the GIL, and
// the Python package (python/moecomm) adds the framework conversions and the stream rules.
// Lifetimes (tensors.hpp): every array returned here is a view with an owner that keeps its
// memory valid. Views of communicator memory are owned by the Python communicator object, which
// keeps its group (and so the memory) alive; _roundtrip's view of its input is owned by the
// input's DLPack export. Inputs stay imported (their exports held) until the library call that
// reads them has returned. The Handle, Event and RecvHook objects handed out keep their
// communicator alive too (they refer to its memory, streams or in-flight work).
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moecomm/moecomm.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/streams.hpp"
#include "tensors.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace moecomm::python {
namespace {

// ---------------------------------------------------------------------------------------------
// Exceptions: moecomm.Error (a RuntimeError) and its subclasses, each also deriving from the
// closest built-in exception so that `except ValueError` and `except TimeoutError` work.
PyObject* g_error = nullptr;
PyObject* g_invalid_argument = nullptr;
PyObject* g_cuda_error = nullptr;
PyObject* g_timeout_error = nullptr;
PyObject* g_unsupported = nullptr;

PyObject* new_exception(nb::module_& m, const char* name, const char* doc, PyObject* bases) {
  const std::string qualified = std::string("moecomm.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
  if (!type) throw nb::python_error();
  m.attr(name) = nb::handle(type);  // the module holds a reference; `type` stays alive with it
  return type;
}

void register_exceptions(nb::module_& m) {
  nb::object base = nb::make_tuple(nb::handle(PyExc_RuntimeError));
  g_error = new_exception(m, "Error", "Base class of every error moecomm raises.", base.ptr());
  nb::object inv = nb::make_tuple(nb::handle(g_error), nb::handle(PyExc_ValueError));
  g_invalid_argument = new_exception(
      m, "InvalidArgument",
      "An argument or a Config field is out of range or of the wrong shape, dtype or device. "
      "The message starts with its name.",
      inv.ptr());
  nb::object err = nb::make_tuple(nb::handle(g_error));
  g_cuda_error = new_exception(m, "CudaError", "A CUDA call failed.", err.ptr());
  nb::object to = nb::make_tuple(nb::handle(g_error), nb::handle(PyExc_TimeoutError));
  g_timeout_error = new_exception(
      m, "TimeoutError",
      "A device-side wait exceeded Config.timeout_seconds; the message names rank, peer and phase. "
      "The group is unusable afterwards.",
      to.ptr());
  g_unsupported =
      new_exception(m, "Unsupported",
                    "The requested feature does not exist here (e.g. no CUDA device).", err.ptr());

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      PyErr_SetString(g_invalid_argument, e.what());
    } catch (const TimeoutError& e) {
      PyErr_SetString(g_timeout_error, e.what());
    } catch (const Unsupported& e) {
      PyErr_SetString(g_unsupported, e.what());
    } catch (const CudaError& e) {
      PyErr_SetString(g_cuda_error, e.what());
    } catch (const Error& e) {
      PyErr_SetString(g_error, e.what());
    }
  });
}

using detail::DeviceGuard;

cudaStream_t as_stream(uintptr_t s) {
  return reinterpret_cast<cudaStream_t>(s);
}
uintptr_t as_int(cudaStream_t s) {
  return reinterpret_cast<uintptr_t>(s);
}

// ---------------------------------------------------------------------------------------------
// Config: mode and scale_format as strings ("ll", "ht", "auto"; "f32", "pow2").
Mode parse_mode(const std::string& s) {
  Mode m;
  if (!mode_from_name(s, &m))
    throw InvalidArgument("Config.mode: expected 'll', 'ht' or 'auto', got '" + s + "'");
  return m;
}
ScaleFormat parse_scale_format(const std::string& s) {
  ScaleFormat f;
  if (!scale_format_from_name(s, &f))
    throw InvalidArgument("Config.scale_format: expected 'f32' or 'pow2', got '" + s + "'");
  return f;
}

// ---------------------------------------------------------------------------------------------
/// A CUDA event that Python can record and wait on (stream ordering between the caller's
/// stream and a communicator's stream).
class CudaEvent {
 public:
  explicit CudaEvent(int device) : device_(device) {
    DeviceGuard guard(device_);
    MOECOMM_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
  }
  ~CudaEvent() {
    if (event_) {
      int prev = 0;
      cudaGetDevice(&prev);
      cudaSetDevice(device_);
      cudaEventDestroy(event_);
      cudaSetDevice(prev);
    }
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  void record(uintptr_t stream) {
    DeviceGuard guard(device_);
    MOECOMM_CUDA_CHECK(cudaEventRecord(event_, as_stream(stream)));
  }
  /// `stream` waits for the recorded work.
  void stream_wait(uintptr_t stream) const {
    DeviceGuard guard(device_);
    MOECOMM_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), event_, 0));
  }
  void synchronize() const { MOECOMM_CUDA_CHECK(cudaEventSynchronize(event_)); }
  bool query() const {
    const cudaError_t e = cudaEventQuery(event_);
    if (e == cudaErrorNotReady) {
      cudaGetLastError();
      return false;
    }
    MOECOMM_CUDA_CHECK(e);
    return true;
  }
  uintptr_t native() const { return reinterpret_cast<uintptr_t>(event_); }
  int device() const { return device_; }

 private:
  cudaEvent_t event_ = nullptr;
  int device_;
};

/// `waiter` waits for the work queued on `signaler` so far (no host synchronisation).
void stream_wait_stream(uintptr_t waiter, uintptr_t signaler, int device) {
  if (waiter == signaler) return;
  DeviceGuard guard(device);
  detail::stream_wait(as_stream(waiter), as_stream(signaler));
}

// ---------------------------------------------------------------------------------------------
/// One rank's communicator as Python sees it: `keep` owns what `comm` lives in (the virtual
/// group, or the communicator itself for a process group).
struct PyComm {
  std::shared_ptr<void> keep;
  MoECommunicator* comm = nullptr;

  MoECommunicator& get() {
    if (!comm) throw InvalidArgument("communicator: closed");
    return *comm;
  }
};

struct PyGroup {
  std::shared_ptr<VirtualGroup> group;
};

/// The Python object of a communicator: the owner of the views of its memory.
nb::object owner_of(PyComm& self) {
  nb::object owner = nb::find(&self);
  if (!owner.is_valid()) throw Error("internal: the communicator has no Python object");
  return owner;
}

/// A Handle, Event or RecvHook as Python sees it, with the Python object of the communicator
/// that made it: a handle names slots of that communicator's pool, an asynchronous event marks
/// work still using its memory, and a receive hook launches kernels on its memory and streams,
/// so none of them may outlive it.
template <typename T>
struct Held {
  T value;
  nb::object comm;
};

template <typename T>
nb::object held(const T& value, const nb::object& comm) {
  if (!value.valid()) return nb::none();
  return nb::cast(Held<T>{value, comm});
}

nb::dict dispatch(PyComm& self, nb::handle x, nb::handle x_scales, nb::handle topk_idx,
                  nb::handle topk_weights, bool quantize_fp8, bool worst_case,
                  const Held<Handle>* previous_handle, uintptr_t stream, bool async,
                  bool return_recv_hook, bool bf16_as_u16) {
  MoECommunicator& comm = self.get();
  // The inputs' exports stay held until the call has returned (and are released with the GIL).
  const Input x_in = to_input(x, "x", InputKind::kX);
  const Input x_scales_in = to_input(x_scales, "x_scales");
  const Input topk_idx_in = to_input(topk_idx, "topk_idx");
  const Input topk_weights_in = to_input(topk_weights, "topk_weights");
  DispatchArgs args;
  args.x = x_in.view;
  args.x_scales = x_scales_in.view;
  args.topk_idx = topk_idx_in.view;
  args.topk_weights = topk_weights_in.view;
  DispatchOptions opt;
  opt.quantize_fp8 = quantize_fp8;
  opt.sizing = worst_case ? Sizing::kWorstCase : Sizing::kExact;
  opt.previous_handle = previous_handle ? &previous_handle->value : nullptr;
  opt.stream = as_stream(stream);
  opt.async = async;
  opt.return_recv_hook = return_recv_hook;
  DispatchOutput out;
  {
    nb::gil_scoped_release release;  // exact HT dispatch waits on the host for the counts
    out = comm.dispatch(args, opt);
  }
  nb::object owner = owner_of(self);
  OutputOptions oo;
  oo.bf16_as_u16 = bf16_as_u16;
  nb::dict d;
  d["mode"] = mode_short_name(out.mode);
  d["recv_x"] = to_array(out.recv_x, owner, oo);
  d["recv_x_scales"] = to_array(out.recv_x_scales, owner, oo);
  d["recv_topk_idx"] = to_array(out.recv_topk_idx, owner, oo);
  d["recv_topk_weights"] = to_array(out.recv_topk_weights, owner, oo);
  d["recv_src_token"] = to_array(out.recv_src_token, owner, oo);
  d["recv_rank_prefix"] = to_array(out.recv_rank_prefix, owner, oo);
  d["num_recv_tokens_per_expert"] = to_array(out.num_recv_tokens_per_expert, owner, oo);
  d["num_recv_tokens_device"] = to_array(out.num_recv_tokens_device, owner, oo);
  d["num_recv_tokens"] = out.num_recv_tokens;
  d["num_recv_tokens_per_expert_host"] = out.num_recv_tokens_per_expert_host;
  d["recv_count"] = to_array(out.recv_count, owner, oo);
  d["recv_src_info"] = to_array(out.recv_src_info, owner, oo);
  d["recv_layout"] = to_array(out.recv_layout, owner, oo);
  d["handle"] = nb::cast(Held<Handle>{out.handle, owner});
  d["event"] = held(out.event, owner);
  d["hook"] = held(out.hook, owner);
  return d;
}

nb::dict combine(PyComm& self, nb::handle y, const Held<Handle>& handle, nb::handle topk_weights,
                 nb::handle recv_topk_weights, nb::handle bias, nb::handle out_arg,
                 uintptr_t stream, bool async, bool return_recv_hook, bool bf16_as_u16) {
  MoECommunicator& comm = self.get();
  // The inputs' exports stay held until the call has returned (and are released with the GIL).
  const Input y_in = to_input(y, "y");
  const Input topk_weights_in = to_input(topk_weights, "topk_weights");
  const Input recv_topk_weights_in = to_input(recv_topk_weights, "recv_topk_weights");
  const Input bias_in = to_input(bias, "bias");
  const Input out_in = to_input(out_arg, "out");
  CombineArgs args;
  args.y = y_in.view;
  args.topk_weights = topk_weights_in.view;
  args.recv_topk_weights = recv_topk_weights_in.view;
  args.bias = bias_in.view;
  CombineOptions opt;
  opt.out = out_in.view;
  opt.stream = as_stream(stream);
  opt.async = async;
  opt.return_recv_hook = return_recv_hook;
  CombineOutput out;
  {
    nb::gil_scoped_release release;
    out = comm.combine(args, handle.value, opt);
  }
  nb::object owner = owner_of(self);
  OutputOptions oo;
  oo.bf16_as_u16 = bf16_as_u16;
  nb::dict d;
  // A caller-owned `out` is returned by the Python layer itself (same object).
  d["out"] = opt.out.present() ? nb::none() : to_array(out.out, owner, oo);
  d["combined_topk_weights"] = to_array(out.combined_topk_weights, owner, oo);
  d["event"] = held(out.event, owner);
  d["hook"] = held(out.hook, owner);
  return d;
}

nb::dict get_layout(PyComm& self, nb::handle topk_idx, uintptr_t stream) {
  MoECommunicator& comm = self.get();
  const Input idx = to_input(topk_idx, "topk_idx");  // held until the call has returned
  Layout l;
  {
    nb::gil_scoped_release release;
    l = comm.get_layout(idx.view, as_stream(stream));
  }
  nb::object owner = owner_of(self);
  OutputOptions oo;
  nb::dict d;
  d["num_tokens_per_rank"] = to_array(l.num_tokens_per_rank, owner, oo);
  d["num_tokens_per_expert"] = to_array(l.num_tokens_per_expert, owner, oo);
  d["is_token_in_rank"] = to_array(l.is_token_in_rank, owner, oo);
  d["num_recv_tokens_per_rank"] = to_array(l.num_recv_tokens_per_rank, owner, oo);
  d["num_recv_tokens_per_expert"] = to_array(l.num_recv_tokens_per_expert, owner, oo);
  d["num_tokens_per_node"] =
      l.num_tokens_per_node.present() ? to_array(l.num_tokens_per_node, owner, oo) : nb::none();
  return d;
}

// ---------------------------------------------------------------------------------------------
void bind_config(nb::module_& m) {
  nb::class_<Config>(m, "Config",
                     "moecomm::Config (the Python package wraps it in MoECommunicatorConfig).")
      .def(nb::init<>())
      .def_rw("num_experts", &Config::num_experts)
      .def_rw("hidden", &Config::hidden)
      .def_rw("topk", &Config::topk)
      .def_rw("max_tokens_per_rank", &Config::max_tokens_per_rank)
      .def_prop_rw(
          "mode", [](const Config& c) { return std::string(mode_short_name(c.mode)); },
          [](Config& c, const std::string& s) { c.mode = parse_mode(s); })
      .def_rw("num_sms", &Config::num_sms)
      .def_rw("threads_per_block", &Config::threads_per_block)
      .def_rw("expert_alignment", &Config::expert_alignment)
      .def_rw("enable_fp8", &Config::enable_fp8)
      .def_prop_rw(
          "scale_format",
          [](const Config& c) {
            return std::string(c.scale_format == ScaleFormat::kPowerOfTwo ? "pow2" : "f32");
          },
          [](Config& c, const std::string& s) { c.scale_format = parse_scale_format(s); })
      .def_rw("timeout_seconds", &Config::timeout_seconds)
      .def_rw("max_recv_tokens", &Config::max_recv_tokens)
      .def_rw("low_latency_max_tokens", &Config::low_latency_max_tokens)
      .def_rw("auto_low_latency_max_tokens", &Config::auto_low_latency_max_tokens)
      .def_rw("validate_inputs", &Config::validate_inputs)
      .def_rw("mask_unresponsive_ranks", &Config::mask_unresponsive_ranks)
      .def_rw("rdma_bytes", &Config::rdma_bytes)
      .def_rw("nic_model_gbps", &Config::nic_model_gbps)
      .def_rw("nic_model_latency_us", &Config::nic_model_latency_us)
      .def_prop_rw(
          "engine", [](const Config& c) { return std::string(rdma_engine_name(c.engine)); },
          [](Config& c, const std::string& s) {
            if (!rdma_engine_from_name(s, &c.engine))
              throw InvalidArgument("Config.engine: expected 'auto', 'loopback' or 'gin', got '" +
                                    s + "'");
          })
      .def("validate", &Config::validate, "num_ranks"_a)
      .def("local_experts", &Config::local_experts, "num_ranks"_a)
      .def("ll_capacity", &Config::ll_capacity)
      .def("to_text", &Config::to_text)
      .def("load_file", &Config::load_file, "path"_a)
      .def("save_file", &Config::save_file, "path"_a);
}

void bind_values(nb::module_& m) {
  // Each keeps its communicator alive (Held). Made only by dispatch and combine.
  using PyHandle = Held<Handle>;
  using PyEvent = Held<Event>;
  using PyRecvHook = Held<RecvHook>;
  nb::class_<PyHandle>(m, "Handle", "The routing of one dispatch (moecomm::Handle).")
      .def_prop_ro("valid", [](const PyHandle& h) { return h.value.valid(); })
      .def_prop_ro("mode",
                   [](const PyHandle& h) { return std::string(mode_short_name(h.value.mode())); })
      .def_prop_ro("num_tokens", [](const PyHandle& h) { return h.value.num_tokens(); })
      .def_prop_ro("num_recv_tokens", [](const PyHandle& h) { return h.value.num_recv_tokens(); });

  nb::class_<PyEvent>(m, "Event", "Completion of an asynchronous call (moecomm::Event).")
      .def_prop_ro("valid", [](const PyEvent& e) { return e.value.valid(); })
      .def(
          "synchronize", [](const PyEvent& e) { e.value.synchronize(); },
          nb::call_guard<nb::gil_scoped_release>())
      .def(
          "stream_wait", [](const PyEvent& e, uintptr_t s) { e.value.stream_wait(as_stream(s)); },
          "stream"_a, nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("native",
                   [](const PyEvent& e) { return reinterpret_cast<uintptr_t>(e.value.native()); });

  nb::class_<PyRecvHook>(m, "RecvHook",
                         "The receive phase of a low-latency call (moecomm::RecvHook).")
      .def_prop_ro("valid", [](const PyRecvHook& h) { return h.value.valid(); })
      .def(
          "__call__", [](const PyRecvHook& h, uintptr_t s) { h.value(as_stream(s)); },
          "stream"_a = 0, nb::call_guard<nb::gil_scoped_release>());

  nb::class_<CudaEvent>(m, "CudaEvent", "A CUDA event (stream ordering helper).")
      .def(nb::init<int>(), "device"_a)
      .def("record", &CudaEvent::record, "stream"_a)
      .def("stream_wait", &CudaEvent::stream_wait, "stream"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def("synchronize", &CudaEvent::synchronize, nb::call_guard<nb::gil_scoped_release>())
      .def("query", &CudaEvent::query)
      .def_prop_ro("native", &CudaEvent::native)
      .def_prop_ro("device", &CudaEvent::device);
}

void bind_comm(nb::module_& m) {
  nb::class_<PyComm>(m, "Communicator", "One rank's moecomm::MoECommunicator.")
      .def_prop_ro("rank", [](PyComm& s) { return s.get().rank(); })
      .def_prop_ro("num_ranks", [](PyComm& s) { return s.get().num_ranks(); })
      .def_prop_ro("num_nodes", [](PyComm& s) { return s.get().num_nodes(); })
      .def_prop_ro("device", [](PyComm& s) { return s.get().device(); })
      .def_prop_ro("stream", [](PyComm& s) { return as_int(s.get().stream()); })
      .def_prop_ro("config", [](PyComm& s) { return s.get().config(); })
      .def("dispatch", &dispatch, "x"_a.none(), "x_scales"_a.none(), "topk_idx"_a.none(),
           "topk_weights"_a.none(), "quantize_fp8"_a, "worst_case"_a, "previous_handle"_a.none(),
           "stream"_a, "async_"_a, "return_recv_hook"_a, "bf16_as_u16"_a)
      .def("combine", &combine, "y"_a.none(), "handle"_a, "topk_weights"_a.none(),
           "recv_topk_weights"_a.none(), "bias"_a.none(), "out"_a.none(), "stream"_a, "async_"_a,
           "return_recv_hook"_a, "bf16_as_u16"_a)
      .def("get_layout", &get_layout, "topk_idx"_a.none(), "stream"_a)
      .def(
          "combine_buffer",
          [](PyComm& s, const Held<Handle>& h, bool bf16_as_u16) {
            const TensorView v = s.get().combine_buffer(h.value);
            OutputOptions oo;
            oo.bf16_as_u16 = bf16_as_u16;
            return to_array(v, owner_of(s), oo);
          },
          "handle"_a, "bf16_as_u16"_a = false)
      .def(
          "synchronize", [](PyComm& s) { s.get().synchronize(); },
          nb::call_guard<nb::gil_scoped_release>())
      .def("check_errors", [](PyComm& s) { s.get().check_errors(); })
      .def(
          "mask_rank", [](PyComm& s, int rank, bool masked) { s.get().mask_rank(rank, masked); },
          "rank"_a, "masked"_a = true)
      .def("masked_ranks", [](PyComm& s) { return s.get().masked_ranks(); })
      .def("clear_rank_masks", [](PyComm& s) { s.get().clear_rank_masks(); });

  nb::class_<PyGroup>(m, "VirtualGroup", "moecomm::VirtualGroup: R ranks in this process.")
      .def(
          "__init__",
          [](PyGroup* self, const Config& config, int num_ranks, std::vector<int> devices,
             int num_nodes) {
            std::shared_ptr<VirtualGroup> g;
            {
              nb::gil_scoped_release release;
              g = std::make_shared<VirtualGroup>(config, num_ranks, std::move(devices), num_nodes);
            }
            new (self) PyGroup{std::move(g)};
          },
          "config"_a, "num_ranks"_a, "devices"_a, "num_nodes"_a = 1)
      .def_prop_ro("size", [](PyGroup& g) { return g.group->size(); })
      .def_prop_ro("num_nodes", [](PyGroup& g) { return g.group->num_nodes(); })
      .def(
          "comm",
          [](PyGroup& g, int rank) {
            MoECommunicator& c = (*g.group)[rank];
            return PyComm{g.group, &c};
          },
          "rank"_a)
      .def(
          "synchronize", [](PyGroup& g) { g.group->synchronize(); },
          nb::call_guard<nb::gil_scoped_release>());

  nb::class_<ProcessGroupBuilder>(m, "ProcessGroupBuilder",
                                  "One rank of a group whose ranks are processes (CUDA IPC).")
      .def(nb::init<const Config&, int, int, int>(), "config"_a, "rank"_a, "size"_a, "device"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def("local_handle",
           [](const ProcessGroupBuilder& b) {
             const std::vector<uint8_t> h = b.local_handle();
             return nb::bytes(reinterpret_cast<const char*>(h.data()), h.size());
           })
      .def_static("handle_size", &ProcessGroupBuilder::handle_size)
      .def_prop_rw("host_id", &ProcessGroupBuilder::host_id, &ProcessGroupBuilder::set_host_id)
      .def_prop_ro("num_nodes", &ProcessGroupBuilder::num_nodes)
      .def(
          "connect",
          [](ProcessGroupBuilder& b, nb::bytes all) {
            const auto* p = static_cast<const uint8_t*>(all.data());
            std::vector<uint8_t> handles(p, p + all.size());
            std::unique_ptr<MoECommunicator> c;
            {
              nb::gil_scoped_release release;
              c = b.connect(handles);
            }
            std::shared_ptr<MoECommunicator> shared(std::move(c));
            MoECommunicator* raw = shared.get();
            return PyComm{std::shared_ptr<void>(shared), raw};
          },
          "all_handles"_a);
}

}  // namespace
}  // namespace moecomm::python

NB_MODULE(_C, m) {
  using namespace moecomm::python;
  m.doc() = "moecomm extension (nanobind); use the `moecomm` package instead.";
  // Views handed to frameworks may outlive the interpreter's teardown order (a torch tensor
  // holding a communicator in a global): not a leak worth a warning at exit.
  nb::set_leak_warnings(false);
  register_exceptions(m);
  bind_config(m);
  bind_values(m);
  bind_comm(m);

  m.def("version", [] { return std::string(moecomm::version()); });
  m.def("cuda_device_count", &moecomm::cuda_device_count);
  m.def("device_sm_count", &moecomm::device_sm_count, "device"_a);
  m.def("required_rdma_bytes", &moecomm::required_rdma_bytes, "config"_a, "num_ranks"_a,
        "num_nodes"_a);
  m.def("cuda_runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("stream_wait_stream", &stream_wait_stream, "waiter"_a, "signaler"_a, "device"_a,
        nb::call_guard<nb::gil_scoped_release>());
  m.def(
      "stream_synchronize",
      [](uintptr_t s, int device) {
        DeviceGuard guard(device);
        MOECOMM_CUDA_CHECK(cudaStreamSynchronize(as_stream(s)));
      },
      "stream"_a, "device"_a, nb::call_guard<nb::gil_scoped_release>());
  // Test hook: an array through to_input and back (dtype mapping, shapes, strides, ownership).
  // The returned view is owned by the input's DLPack export, which is what keeps the memory
  // valid (the input object alone need not: its export may own a copy).
  m.def(
      "_roundtrip",
      [](nb::handle a, bool as_x, bool bf16_as_u16) {
        Input in = to_input(a, "a", as_x ? InputKind::kX : InputKind::kGeneric);
        const moecomm::TensorView v = in.view;
        OutputOptions oo;
        oo.bf16_as_u16 = bf16_as_u16;
        nb::dict d;
        d["dtype"] = std::string(moecomm::dtype_name(v.dtype));
        d["describe"] = v.describe();
        d["array"] = to_array(v, export_owner(std::move(in)), oo);
        return d;
      },
      "a"_a, "as_x"_a = false, "bf16_as_u16"_a = false);
}
