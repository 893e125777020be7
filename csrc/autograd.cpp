// Autograd and autocast of every op with a backward op, in C++: a call from Python crosses one
// dispatcher and its backward runs with no Python frame (at IPMT's batch sizes the host's cost of
// calling an op, not its kernels, sets a GPU's pace).
//
// Autograd is derived from the schemas (ops.cpp): `<op>_backward` takes the gradient of the op's
// result (its first output), then forward arguments and outputs by name, and returns
// `grad_<argument>` for each differentiable argument. One C++ autograd function serves every op:
// it runs the forward below autograd (CPU/CUDA kernels, or the fake ones while tracing), saves
// what the backward op names, and marks every output but the result non-differentiable.
//
// Autocast: each op's rule (kAutocastRules) is registered for CPU and CUDA. `lower_precision`
// casts floating arguments to the autocast dtype like nn.Linear (float64 is never cast), but the
// exempt ones; `float32` casts them to float32 like grid_sample; `compute_dtype` passes the
// autocast dtype to the op's `compute_dtype` argument, for the sub-layer ops that choose per
// product what to cast. Backward ops have no rule: they take their forward's dtypes.
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The positions, in a forward op's arguments and outputs, of what its backward op takes.
struct BackwardSignature {
  c10::OperatorHandle backward;
  // Per backward argument after the gradient: a forward argument (>= 0) or output (-1 - index).
  std::vector<int64_t> sources;
  // Per backward argument after the gradient: whether it is a tensor (saved for backward) and
  // whether an optional one (an undefined saved tensor goes back as None).
  std::vector<bool> tensor, optional_tensor;
  // The forward arguments the backward op returns a gradient for, in its order.
  std::vector<int64_t> differentiable;
  size_t num_arguments = 0, num_outputs = 0;
};

int64_t find_name(const std::vector<c10::Argument>& list, const std::string& name) {
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i].name() == name) return static_cast<int64_t>(i);
  }
  return -1;
}

bool is_optional_tensor(const c10::Argument& argument) {
  const auto& type = argument.type();
  return type->kind() == c10::TypeKind::OptionalType &&
         type->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::TensorType;
}

BackwardSignature derive_signature(const c10::OperatorHandle& forward) {
  const auto& schema = forward.schema();
  const std::string backward_name = schema.name() + "_backward";
  auto backward = c10::Dispatcher::singleton().findSchemaOrThrow(backward_name.c_str(), "");
  const auto& arguments = schema.arguments();
  const auto& outputs = schema.returns();
  BackwardSignature signature{backward};
  signature.num_arguments = arguments.size();
  signature.num_outputs = outputs.size();
  const auto& backward_arguments = backward.schema().arguments();
  TORCH_CHECK(backward_arguments.size() >= 1, backward_name, " must take the result's gradient first");
  for (size_t i = 1; i < backward_arguments.size(); ++i) {
    const std::string& name = backward_arguments[i].name();
    const int64_t argument = find_name(arguments, name), output = find_name(outputs, name);
    TORCH_CHECK((argument >= 0) != (output >= 0), backward_name, ": argument '", name,
                "' must name exactly one argument or output of ", schema.name());
    signature.sources.push_back(argument >= 0 ? argument : -1 - output);
    const bool optional_tensor = is_optional_tensor(backward_arguments[i]);
    signature.tensor.push_back(optional_tensor ||
                               backward_arguments[i].type()->kind() == c10::TypeKind::TensorType);
    signature.optional_tensor.push_back(optional_tensor);
  }
  for (const auto& result : backward.schema().returns()) {
    const std::string& name = result.name();
    TORCH_CHECK(name.rfind("grad_", 0) == 0, backward_name, ": returns must be named grad_<argument>, got '", name,
                "'");
    const int64_t argument = find_name(arguments, name.substr(5));
    TORCH_CHECK(argument >= 0, backward_name, ": '", name, "' names no argument of ", schema.name());
    signature.differentiable.push_back(argument);
  }
  return signature;
}

class DerivedFunction : public torch::autograd::Function<DerivedFunction> {
 public:
  // `differentiable` holds the tensors of signature->differentiable that are given (an optional
  // one may be None), the autograd inputs; `given` their positions in signature->differentiable;
  // `arguments` are all the forward op's arguments.
  static variable_list forward(AutogradContext* ctx, const c10::OperatorHandle* forward_op,
                               const BackwardSignature* signature, const std::vector<c10::IValue>& arguments,
                               const std::vector<int64_t>& given, at::TensorList differentiable) {
    torch::jit::Stack stack(arguments.begin(), arguments.end());
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      forward_op->callBoxed(stack);
    }
    variable_list outputs;
    outputs.reserve(stack.size());
    for (auto& value : stack) outputs.push_back(value.toTensor());
    std::vector<Tensor> saved;
    c10::impl::GenericList constants(c10::AnyType::get());
    for (size_t i = 0; i < signature->sources.size(); ++i) {
      const int64_t source = signature->sources[i];
      const c10::IValue& value = source >= 0 ? arguments[source] : stack[-1 - source];
      if (signature->tensor[i]) {
        saved.push_back(value.isTensor() ? value.toTensor() : Tensor());
      } else {
        constants.push_back(value);
      }
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["constants"] = constants;
    ctx->saved_data["signature"] = reinterpret_cast<int64_t>(signature);
    ctx->saved_data["given"] = given;
    if (outputs.size() > 1) ctx->mark_non_differentiable(variable_list(outputs.begin() + 1, outputs.end()));
    ctx->set_materialize_grads(false);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto* signature = reinterpret_cast<const BackwardSignature*>(ctx->saved_data["signature"].toInt());
    const auto given = ctx->saved_data["given"].toIntVector();
    // One slot each for forward_op, signature, arguments and given, then the differentiable tensors.
    constexpr size_t kLeadingSlots = 4;
    variable_list result(kLeadingSlots + given.size());
    if (!grads[0].defined()) return result;  // the result took no part in what is differentiated
    torch::jit::Stack stack;
    stack.reserve(1 + signature->sources.size());
    stack.emplace_back(grads[0].contiguous());
    const auto saved = ctx->get_saved_variables();
    const auto constants = ctx->saved_data["constants"].toList();
    size_t next_saved = 0, next_constant = 0;
    for (size_t i = 0; i < signature->sources.size(); ++i) {
      if (!signature->tensor[i]) {
        stack.push_back(constants.get(next_constant++));
        continue;
      }
      const Tensor& tensor = saved[next_saved++];
      if (tensor.defined() || !signature->optional_tensor[i]) {
        stack.emplace_back(tensor);
      } else {
        stack.emplace_back();
      }
    }
    signature->backward.callBoxed(stack);
    for (size_t j = 0; j < given.size(); ++j) {
      // needs_input_grad counts the autograd inputs (the given differentiable tensors) only.
      if (ctx->needs_input_grad(j)) result[kLeadingSlots + j] = stack[given[j]].toTensor();
    }
    return result;
  }
};

// The Autograd-key kernel of one op. The signature is derived at the first call: the schemas may
// be registered after the kernels (static initialisation order across files is unspecified).
class AutogradKernel : public c10::OperatorKernel {
 public:
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
    std::call_once(derived_, [&] { signature_ = std::make_unique<BackwardSignature>(derive_signature(op)); });
    std::vector<c10::IValue> arguments = torch::jit::pop(*stack, signature_->num_arguments);
    std::vector<Tensor> differentiable;
    std::vector<int64_t> given;
    for (size_t j = 0; j < signature_->differentiable.size(); ++j) {
      const auto& argument = arguments[signature_->differentiable[j]];
      if (argument.isTensor() && argument.toTensor().defined()) {
        differentiable.push_back(argument.toTensor());
        given.push_back(static_cast<int64_t>(j));
      }
    }
    variable_list outputs = DerivedFunction::apply(&op, signature_.get(), arguments, given, at::TensorList(differentiable));
    for (auto& output : outputs) stack->emplace_back(std::move(output));
  }

 private:
  std::once_flag derived_;
  std::unique_ptr<BackwardSignature> signature_;
};

// The Autograd-key kernel of a backward op: it runs below autograd, so that the ATen calls inside
// skip the autograd and view-tracking kernels (one dispatcher hop and a view record each, hundreds
// per layer), whether the call comes from DerivedFunction::backward or from a graph that
// torch.compile traced. A backward op has no derivative of its own: differentiating through it
// (create_graph=True) is refused by name rather than cut short without a word.
class BackwardAutogradKernel : public c10::OperatorKernel {
 public:
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    if (torch::autograd::GradMode::is_enabled()) {
      const size_t count = op.schema().arguments().size();
      for (size_t i = stack->size() - count; i < stack->size(); ++i) {
        const c10::IValue& value = (*stack)[i];
        TORCH_CHECK(!value.isTensor() || !value.toTensor().requires_grad(), op.schema().name(),
                    ": the compiled ops have no double backward (create_graph=True); use a Python backend "
                    "(e.g. backend='reference') to differentiate twice");
      }
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
};

enum class AutocastPolicy { kLowerPrecision, kFloat32, kComputeDtype };

struct AutocastRule {
  const char* op;
  AutocastPolicy policy;
  std::vector<std::string> exempt;  // arguments left as they are (kLowerPrecision)
};

// Every op with a backward op, and what autocast does to it (see the file comment). The
// coordinates of the deformable attention keep their dtype: they address sub-pixel positions.
const std::vector<AutocastRule>& autocast_rules() {
  static const std::vector<AutocastRule> rules = {
      {"ms_deform_sample", AutocastPolicy::kFloat32, {}},
      {"masked_prototype_attention", AutocastPolicy::kLowerPrecision, {}},
      {"prototype_mask_logits", AutocastPolicy::kLowerPrecision, {}},
      {"prototype_query_update", AutocastPolicy::kLowerPrecision, {}},
      {"feed_forward", AutocastPolicy::kLowerPrecision, {}},
      {"deformable_self_attention", AutocastPolicy::kLowerPrecision, {"reference_points", "offset_normalizer"}},
      {"prototype_attention_block", AutocastPolicy::kComputeDtype, {}},
      {"feed_forward_block", AutocastPolicy::kComputeDtype, {}},
      {"prediction_head", AutocastPolicy::kComputeDtype, {}},
      {"deformable_self_attention_block", AutocastPolicy::kComputeDtype, {}},
      {"query_update_block", AutocastPolicy::kComputeDtype, {}},
  };
  return rules;
}

template <c10::DeviceType kDevice>
class AutocastKernel : public c10::OperatorKernel {
 public:
  explicit AutocastKernel(const AutocastRule& rule) : rule_(rule) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
    std::call_once(derived_, [&] { derive(op.schema()); });
    c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
    const size_t first = stack->size() - cast_.size();
    const auto dtype = at::autocast::get_autocast_dtype(kDevice);
    if (rule_.policy == AutocastPolicy::kComputeDtype) {
      (*stack)[first + compute_dtype_argument_] = c10::IValue(dtype);
    } else {
      const auto target = rule_.policy == AutocastPolicy::kFloat32 ? at::kFloat : dtype;
      for (size_t i = 0; i < cast_.size(); ++i) {
        auto& value = (*stack)[first + i];
        if (cast_[i] && value.isTensor()) value = at::autocast::cached_cast(target, value.toTensor(), kDevice);
      }
    }
    op.callBoxed(*stack);
  }

 private:
  void derive(const c10::FunctionSchema& schema) {
    const auto& arguments = schema.arguments();
    cast_.resize(arguments.size());
    for (size_t i = 0; i < arguments.size(); ++i) {
      cast_[i] = std::find(rule_.exempt.begin(), rule_.exempt.end(), arguments[i].name()) == rule_.exempt.end();
    }
    compute_dtype_argument_ = find_name(arguments, "compute_dtype");
    TORCH_CHECK((rule_.policy == AutocastPolicy::kComputeDtype) == (compute_dtype_argument_ >= 0), rule_.op,
                ": the compute_dtype rule needs, and only it takes, a compute_dtype argument");
  }

  const AutocastRule& rule_;
  std::once_flag derived_;
  std::vector<bool> cast_;
  int64_t compute_dtype_argument_ = -1;
};

}  // namespace

// Every op of the table has a backward op: each gets the derived autograd and its autocast rule,
// its backward op the kernel that runs it below autograd.
TORCH_LIBRARY_IMPL(ipmt_fast, Autograd, m) {
  for (const auto& rule : autocast_rules()) {
    m.impl(rule.op, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<AutogradKernel>()));
    const std::string backward = std::string(rule.op) + "_backward";
    m.impl(backward.c_str(), torch::CppFunction::makeFromBoxedFunctor(std::make_unique<BackwardAutogradKernel>()));
  }
}

TORCH_LIBRARY_IMPL(ipmt_fast, AutocastCPU, m) {
  for (const auto& rule : autocast_rules()) {
    m.impl(rule.op, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<AutocastKernel<c10::kCPU>>(rule)));
  }
}

TORCH_LIBRARY_IMPL(ipmt_fast, AutocastCUDA, m) {
  for (const auto& rule : autocast_rules()) {
    m.impl(rule.op, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<AutocastKernel<c10::kCUDA>>(rule)));
  }
}
