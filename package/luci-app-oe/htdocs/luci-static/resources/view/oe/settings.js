'use strict';
'require view';
'require form';
'require rpc';
'require uci';
'require ui';
'require dom';
'require poll';
'require oe.schema as schema';
'require oe.validate as oev';

// Services -> Opportunistic IPsec -> Settings: a form over /etc/config/oe. The options,
// their kinds, limits and defaults come from oe/schema.js, which is generated from the
// daemon's option table (validate.OPTIONS); oe/validate.js checks each value as the
// daemon's parsers do, so a bad value is refused here before it is saved. After Save &
// Apply (LuCI's uci apply) the page asks the daemon to reload (ubus `oe reload`) and
// shows what it refused; the last good config keeps running then (docs/luci.md).

var callReload = rpc.declare({ object: 'oe', method: 'reload', expect: { '': {} } });
var callStatus = rpc.declare({ object: 'oe', method: 'status', expect: { '': {} } });

/* Where the options go: one form section per UCI section type, the `oe` one in two tabs.
 * A tab (or section) without `options` takes every option of its type the others do not
 * name, and a section type the layout does not know gets a section of its own, so an
 * option the daemon gains appears here without an edit. */
var LAYOUT = [
	{ type: 'oe', title: _('General'), tabs: [
		{ id: 'general', title: _('General'),
		  options: [ 'enabled', 'log_level', 'wan_interface', 'lan_interface', 'shunt_lifetime',
		             'keep_private_on_stop', 'policy_limit', 'control_socket' ] },
		{ id: 'datapath', title: _('Datapath and offload') }
	] },
	{ type: 'dns', title: _('DNS front'),
	  description: _('The resolver LAN queries go through: it looks up IPsec keys and holds answers until a tunnel is up.') },
	{ type: 'ike', title: _('IKE'), description: _('IKEv2 lifetimes, timers and limits.') },
	{ type: 'identity', title: _('Identity') },
	{ type: 'policy', title: _('Policy groups'),
	  description: _('Destinations per group: private (IPsec or nothing), private-or-clear (IPsec when the peer has a key, else clear), clear-or-private (only answer), clear, block. Entries are CIDR [proto [port]].') }
];

var TITLES = {
	enabled: _('Enabled'), log_level: _('Log level'), wan_interface: _('WAN networks'),
	lan_interface: _('LAN network'), shunt_lifetime: _('Shunt lifetime'),
	keep_private_on_stop: _('Keep private drops when stopped'), policy_limit: _('Policy destination limit'),
	control_socket: _('Control socket'), datapath: _('Datapath'), offload: _('Crypto offload'),
	offload_canary: _('Offload canary interval'), offload_demote: _('Demote failing crypto drivers'),
	packet_hold: _('Hold first packets (NFQUEUE)'), mode: _('Mode'), listen: _('Listen on'),
	upstream: _('Upstream resolvers'), resolv_file: _('Resolver file'), hold_limit: _('Hold limit'),
	ttl_cap: _('TTL cap'), trust_anchor: _('Trust anchor file'), auto_trust_anchor: _('Managed trust anchors'),
	bogus_action: _('Bogus answers'), keyless: _('Keyless names'), tcp_timeout: _('TCP timeout'),
	doh_canary: _('DoH canary'), ike_lifetime: _('IKE SA lifetime'), child_lifetime: _('Child SA lifetime'),
	rekey_margin: _('Rekey margin'), rekey_jitter: _('Rekey jitter'), idle_timeout: _('Idle timeout'),
	retransmit_timeout: _('Retransmit timeout'), retransmit_tries: _('Retransmit tries'),
	dpd_delay: _('DPD delay'), half_open_limit: _('Half-open SA limit'),
	half_open_per_source: _('Half-open per source'), half_open_per_prefix: _('Half-open per prefix'),
	fragment_size: _('IKE fragment size'), cat: _('CAT (client address translation)'),
	esp_proposal: _('ESP proposals'), local_id: _('Local identity'), private_key: _('Private key'),
	group: _('Group'), dest: _('Destinations')
};

/* The layout resolved against the schema:
 * [ { type, title, description, section: <schema section>, tabs: [ { id, title, rows } ] } ]
 * (one tab with id null for a section without tabs) */
function plan(doc) {
	var out = [];
	doc.sections.forEach(function(sec) {
		var l = LAYOUT.filter(function(x) { return x.type == sec.type; })[0] || { type: sec.type, title: sec.type };
		var tabs = l.tabs || [ { id: null, title: null } ], named = {};
		tabs.forEach(function(t) { (t.options || []).forEach(function(n) { named[n] = true; }); });
		out.push({
			type: sec.type, title: l.title, description: l.description, section: sec,
			tabs: tabs.map(function(t) {
				var rows = t.options
					? t.options.map(function(n) {
						return sec.options.filter(function(r) { return r.name == n; })[0];
					}).filter(function(r) { return r; })
					: sec.options.filter(function(r) { return !named[r.name]; });
				return { id: t.id, title: t.title, rows: rows };
			})
		});
	});
	return out;
}

/* Text typed into a list's input but not added (LuCI's DynamicList leaves it out of the
 * value when it is invalid, and saves the rest) */
function pendingItem(option, section_id) {
	var widget = (typeof(option.getUIElement) == 'function') ? option.getUIElement(section_id) : null;
	var input = (widget && widget.node) ? widget.node.querySelector('.add-item > input[type="text"]') : null;
	return (input && /\S/.test(input.value)) ? input.value : null;
}

/* An option's validate(): true, or what is wrong. LuCI calls it for a text field's value,
 * for what is typed into a list's input, and with '' for a list as a whole (on input and
 * again before Save): then the text still waiting in the list's input is checked, so an
 * invalid entry blocks Save instead of being dropped. Empty is fine: a required option is
 * rmempty = false, which LuCI enforces on Save ("must not be empty"). */
function validator(doc, row) {
	return function(section_id, value) {
		if (row.list && (value == null || value === ''))
			value = pendingItem(this, section_id);
		if (value == null || value === '' || (Array.isArray(value) && !value.length))
			return true;
		var values = Array.isArray(value) ? value : [ value ];
		for (var i = 0; i < values.length; i++) {
			var r = oev.check(doc, row, values[i]);
			if (!r.ok)
				return _("'%s' %s").format(values[i], r.error);
		}
		return true;
	};
}

function addOption(s, tab, doc, row) {
	var title = TITLES[row.name] || row.name, o;
	var option = function(cls) {
		return tab ? s.taboption(tab, cls, row.name, title) : s.option(cls, row.name, title);
	};
	if (row.kind == 'bool') {
		o = option(form.Flag);
		o.enabled = '1';
		o.disabled = '0';
		o.default = row.default;
		o.rmempty = false;
	}
	else if (row.kind == 'choice' && !row.list) {
		o = option(form.ListValue);
		row.choices.forEach(function(c) { o.value(c); });
		o.default = (row.default != null) ? row.default : row.choices[0];
		o.rmempty = false;
	}
	else if (row.list) {
		o = option(form.DynamicList);
		if (row.kind == 'choice')
			row.choices.forEach(function(c) { o.value(c); });
		if (row.default && row.default.length)
			o.placeholder = row.default.join(' ');
	}
	else {
		o = option(form.Value);
		if (row.default != null && row.default !== '')
			o.placeholder = row.default;
	}
	o.validate = validator(doc, row);
	if (row.required)
		o.rmempty = false;
	var help = oev.describe(row);
	if (row.default != null && row.default !== '' && !(Array.isArray(row.default) && !row.default.length))
		help += (help ? '; ' : '') + _('default %s').format(Array.isArray(row.default) ? row.default.join(' ') : row.default);
	if (help)
		o.description = help;
	o.datatype = null;
	return o;
}

/* The UCI section a singleton type lives in: the file's own (any name), else the name the
 * shipped file gives it */
function sectionName(section) {
	var found = uci.sections('oe', section.type);
	return found.length ? found[0]['.name'] : section.name;
}

/* Hooks for scripts and tests, set each time LuCI renders the section (again after Add
 * or Delete): data-oe-section on the section, data-oe-group on each policy section */
function hook(s, type) {
	var render = s.renderContents;
	s.renderContents = function() {
		var el = render.apply(this, arguments);
		if (el && el.setAttribute) {
			el.setAttribute('data-oe-section', type);
			if (type == 'policy')
				uci.sections('oe', 'policy').forEach(function(sec) {
					var node = el.querySelector('.cbi-section-node[data-section-id="' + sec['.name'] + '"]');
					if (node)
						node.setAttribute('data-oe-group', sec.group || '');
				});
		}
		return el;
	};
}

return view.extend({
	load: function() {
		return Promise.all([
			uci.load('oe'),
			L.resolveDefault(callStatus(), {})
		]);
	},

	renderReload: function(result, source) {
		var box = E('div', { 'id': 'oe-reload' });
		if (!result || result.accepted == null) {
			box.setAttribute('data-state', 'unknown');
			return box;
		}
		box.setAttribute('data-state', result.accepted ? 'accepted' : 'refused');
		box.setAttribute('data-generation', result.generation);
		box.setAttribute('data-source', source || 'status');
		if (result.accepted) {
			box.className = 'alert-message notice';
			box.appendChild(E('p', {}, _('The daemon runs config generation %d (its last reload was accepted).').format(result.generation)));
		}
		else {
			box.className = 'alert-message warning';
			box.appendChild(E('p', {}, _('The daemon refused the configuration on its last reload; config generation %d keeps running. Problems:').format(result.generation)));
			box.appendChild(E('ul', { 'id': 'oe-reload-problems' }, (result.problems || []).map(function(p) {
				return E('li', { 'class': 'oe-problem' }, p);
			})));
		}
		return box;
	},

	showReload: function(result, source) {
		var box = document.getElementById('oe-reload');
		if (box)
			box.parentNode.replaceChild(this.renderReload(result, source), box);
	},

	/* After uci apply: ask the daemon to reload and show its answer. Through uhttpd's
	 * /ubus the reply of a refused reload (ubus status UNKNOWN_ERROR) still carries
	 * {reload: {accepted: false, problems}}; a gateway that drops it (LuCI's admin/ubus
	 * fallback) leaves a bare status code, and then the status document's last_reload
	 * says the same. */
	reloadDaemon: function() {
		return callReload().then(L.bind(function(reply) {
			if (reply && reply.reload)
				return { result: reply.reload, source: 'reload' };
			return L.resolveDefault(callStatus(), {}).then(function(st) {
				return { result: st.daemon ? st.daemon.last_reload : null, source: 'status' };
			});
		}, this)).then(L.bind(function(out) {
			this.showReload(out.result, out.source);
			if (out.result && !out.result.accepted)
				ui.addNotification(_('oe-routerd refused the new configuration'),
					E('ul', { 'id': 'oe-reload-notification' }, (out.result.problems || []).map(function(p) {
						return E('li', {}, p);
					})), 'warning');
			return out.result;
		}, this));
	},

	handleSaveApply: function(ev, mode) {
		return this.handleSave(ev).then(L.bind(function() {
			var self = this;
			var onApplied = function() {
				document.removeEventListener('uci-applied', onApplied);
				self.reloadDaemon();
			};
			document.addEventListener('uci-applied', onApplied);
			ui.changes.apply(mode == '0');
		}, this));
	},

	render: function(data) {
		var doc = schema.doc, status = data[1] || {};
		var m = new form.Map('oe', _('Opportunistic IPsec: settings'),
			_('The configuration of oe-routerd (/etc/config/oe). Values are checked as the daemon checks them; the daemon re-reads the file after Save & Apply and keeps its last good configuration when it refuses the new one.'));

		plan(doc).forEach(function(p) {
			var s;
			if (p.section.single) {
				s = m.section(form.NamedSection, sectionName(p.section), p.type, p.title, p.description);
				/* a file without the section: an Add button makes it (the defaults hold until then) */
				s.addremove = !uci.sections('oe', p.type).length;
			}
			else {
				s = m.section(form.TypedSection, p.type, p.title, p.description);
				s.anonymous = true;
				s.addremove = true;
			}
			hook(s, p.type);
			p.tabs.forEach(function(t) {
				if (t.id)
					s.tab(t.id, t.title);
				t.rows.forEach(function(row) {
					var o = addOption(s, t.id, doc, row);
					if (p.type == 'policy' && row.name == 'group')
						o.default = 'private';
				});
			});
		});

		return m.render().then(L.bind(function(node) {
			var last = status.daemon ? status.daemon.last_reload : null;
			var page = E('div', { 'id': 'oe-settings', 'data-writable': m.readonly ? '0' : '1' }, [
				this.renderReload(last, 'status'),
				node
			]);
			poll.add(L.bind(function() {
				return L.resolveDefault(callStatus(), {}).then(L.bind(function(st) {
					if (st.daemon && st.daemon.last_reload)
						this.showReload(st.daemon.last_reload, 'status');
				}, this));
			}, this), 10);
			return page;
		}, this));
	}
});
