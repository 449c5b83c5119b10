defmodule NxMlx.Backend.FFT do
  @moduledoc false
  # NxMlx.Backend's Fourier transforms.

  import NxMlx.Backend.Core

  alias Nx.Tensor, as: T

  ## Fourier transforms

  def fft(out, t, opts), do: fourier(out, t, opts, :fft)

  def ifft(out, t, opts), do: fourier(out, t, opts, :ifft)

  defp fourier(%T{type: {:c, 64}} = out, %T{} = t, opts, nx_op) do
    device = op_device([t])
    op = op_fn(device, nx_op, [t])
    x = ref_as(t, {:c, 64}, device)
    r = op.(:fft, [nx_op == :ifft, x, opts[:length], opts[:axis]])

    r = clean_small(op, r, opts[:eps], true, device)

    wrap(out, r, device)
  end

  defp fourier(out, t, opts, nx_op), do: NxMlx.Fallback.run(nx_op, [out, t, opts], op_device([t]))

  # As Nx: values (real and imaginary parts of complex ones) within eps of zero become zero.
  defp clean_small(_op, r, nil, _complex?, _device), do: r

  defp clean_small(op, r, eps, complex?, device) do
    zero = scalar_ref(0, {:f, 32}, device)
    tolerance = scalar_ref(eps, {:f, 32}, device)

    clean = fn part ->
      small = op.(:binary, [:less_equal, op.(:unary, [:abs, part]), tolerance])
      op.(:select, [small, zero, part])
    end

    if complex? do
      re = clean.(op.(:unary, [:real, r]))
      im = clean.(op.(:unary, [:imag, r]))
      i = scalar_ref(Complex.new(0.0, 1.0), {:c, 64}, device)
      op.(:binary, [:add, op.(:astype, [re, :c64]), op.(:binary, [:multiply, im, i])])
    else
      clean.(r)
    end
  end

  # The FFT2/IFFT2/RFFT/IRFFT blocks: one n-dimensional MLX transform.
  def fourier_block(kind, %T{} = out, %T{} = t, lengths, axes, eps) do
    device = op_device([t])
    op = op_fn(device, kind, [t])
    x = ref_as(t, if(kind == :rfft, do: {:f, 32}, else: {:c, 64}), device)
    r = op.(:fftn, [kind, x, lengths, axes])
    wrap(out, clean_small(op, r, eps, kind != :irfft, device), device)
  end
end
